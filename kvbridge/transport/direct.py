# SPDX-License-Identifier: Apache-2.0
"""What the direct-read backends (``cma``, ``nixl``) share: the consumer reads
the producer's registered blocks itself, so the producer only describes its
memory and grants; the consumer checks each grant before reading."""

from __future__ import annotations

import socket

from kvbridge import protocol as P
from kvbridge.errors import ErrorCode
from kvbridge.transport.handle import TransferHandle


def region_info(cache) -> dict:
    """The producer's memory as its consumers address it: per region
    ``[base address, block stride]``, and how many blocks each holds."""
    return {"regions": [[addr, stride] for addr, stride, _ in cache.region_addresses()],
            "num_blocks": cache.num_blocks}


def parse_regions(info: dict) -> tuple[list[tuple[int, int]], int]:
    """``region_info`` as received: ([(base, stride)...], num_blocks)."""
    return [(int(a), int(s)) for a, s in info["regions"]], int(info["num_blocks"])


def send_grant(transport, conn: socket.socket, grant: P.PullGrant) -> None:
    """Producer side of a direct read: the grant is all it sends."""
    P.send_message(conn, grant)
    transport.stats.bytes_served += grant.nbytes


def check_grant(handle: TransferHandle, grant: P.PullGrant, num_blocks: int) -> bool:
    """Whether to read at all: not when cancelled (land nothing), nor with an
    id past the producer's cache (it would address another region's block:
    ``handle`` says so). A grant of the wrong size breaks the protocol: raises."""
    if handle.cancel_requested:
        return False
    if grant.nbytes != handle.nbytes:
        raise P.ProtocolError(f"grant of {grant.nbytes} bytes for a {handle.nbytes}-byte pull")
    if any(b < 0 or b >= num_blocks for b in handle.remote_ids):
        handle._set_error("remote block id beyond the producer's cache", ErrorCode.BLOCKS)
        return False
    return True
