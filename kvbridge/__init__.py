# SPDX-License-Identifier: Apache-2.0
"""kvbridge: KV-cache transfer for disaggregated LLM serving.

The names below are imported on first use (PEP 562), so ``import kvbridge``
(and ``kvbridge --help``) does not pay for torch, msgspec or a transport
until something asks for them.
"""

from __future__ import annotations

import importlib

#: public name -> the module that defines it
_EXPORTS = {
    "KVAgent": "kvbridge.agent",
    "KVTicket": "kvbridge.agent",
    "PagedKVCache": "kvbridge.cache.blocks",
    "StagingPool": "kvbridge.cache.blocks",
    "validate_block_ids": "kvbridge.cache.blocks",
    "BlockIdError": "kvbridge.errors",
    "ErrorCode": "kvbridge.errors",
    "KVBridgeError": "kvbridge.errors",
    "LayoutMismatchError": "kvbridge.errors",
    "TransferError": "kvbridge.errors",
    "KVLayout": "kvbridge.layout",
    "check_compatible": "kvbridge.layout",
    "PROTOCOL_VERSION": "kvbridge.wire_version",
    "TransferHandle": "kvbridge.transport",
    "TransferState": "kvbridge.transport",
    "TransportConfig": "kvbridge.transport",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
