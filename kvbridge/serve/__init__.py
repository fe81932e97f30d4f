# SPDX-License-Identifier: Apache-2.0
"""Serving: start vLLM servers (launch), the router (proxy), the one-command demo (up)."""
