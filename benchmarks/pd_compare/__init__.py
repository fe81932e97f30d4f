# SPDX-License-Identifier: Apache-2.0
"""pd_compare: colocated vLLM vs P/D with NixlConnector vs P/D with
KVBridgeConnector. Entry point: ``run.py`` next to this file."""
