# SPDX-License-Identifier: Apache-2.0
"""Demo tooling: tiny local models and the cross-process block demo."""
