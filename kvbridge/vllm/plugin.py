# SPDX-License-Identifier: Apache-2.0
"""vLLM general plugin: registers ``KVBridgeConnector`` by name.

Entry point ``vllm.general_plugins: kvbridge = kvbridge.vllm.plugin:register``.
vLLM loads general plugins in every process (API server, engine core,
workers) before it builds connectors; registration is lazy (module path +
class name), so this imports nothing heavy.
"""

CONNECTOR_NAME = "KVBridgeConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in getattr(KVConnectorFactory, "_registry", {}):
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvbridge.vllm.connector",
                                          CONNECTOR_NAME)
