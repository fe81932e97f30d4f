# SPDX-License-Identifier: Apache-2.0
"""kvbridge: KV-cache transfer for disaggregated LLM serving."""

from kvbridge.agent import KVAgent, KVTicket
from kvbridge.cache.blocks import PagedKVCache, StagingPool, validate_block_ids
from kvbridge.errors import (
    BlockIdError,
    ErrorCode,
    KVBridgeError,
    LayoutMismatchError,
    TransferError,
)
from kvbridge.layout import KVLayout, check_compatible
from kvbridge.protocol import PROTOCOL_VERSION
from kvbridge.transport import (
    TransferHandle,
    TransferState,
    TransportConfig,
)

__all__ = [
    "KVAgent",
    "KVTicket",
    "KVBridgeError",
    "ErrorCode",
    "TransferError",
    "TransferHandle",
    "TransferState",
    "TransportConfig",
    "PROTOCOL_VERSION",
    "BlockIdError",
    "KVLayout",
    "LayoutMismatchError",
    "PagedKVCache",
    "StagingPool",
    "check_compatible",
    "validate_block_ids",
]
