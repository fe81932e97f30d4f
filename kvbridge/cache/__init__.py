# SPDX-License-Identifier: Apache-2.0
"""Paged KV caches: block export/import, the copy kernels, checksums, TP slices."""
