# SPDX-License-Identifier: Apache-2.0
"""kvbridge's vLLM integration.

``"kv_connector_module_path": "kvbridge.vllm"`` loads ``KVBridgeConnector``
from here; installing kvbridge also registers the name through vLLM's
``vllm.general_plugins`` entry point (``kvbridge.vllm.plugin:register``), so
``"kv_connector": "KVBridgeConnector"`` alone works.
"""

from kvbridge.vllm.connector import KVBridgeConnector

__all__ = ["KVBridgeConnector"]
