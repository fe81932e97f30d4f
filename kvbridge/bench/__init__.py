# SPDX-License-Identifier: Apache-2.0
"""Benchmarks behind ``kvbridge bench``; each prints a table and writes
``benchmarks/results/`` with the command that produced it."""
