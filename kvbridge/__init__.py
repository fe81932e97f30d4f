# SPDX-License-Identifier: Apache-2.0
"""kvbridge: KV-cache transfer for disaggregated LLM serving."""

from kvbridge.agent import KVAgent, KVTicket
from kvbridge.blocks import BlockIdError, PagedKVCache, StagingPool, validate_block_ids
from kvbridge.layout import (
    PROTOCOL_VERSION,
    KVLayout,
    LayoutMismatchError,
    check_compatible,
)

from kvbridge.transport import (
    TransferError,
    TransferHandle,
    TransferState,
    TransportConfig,
)

__all__ = [
    "KVAgent",
    "KVTicket",
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
