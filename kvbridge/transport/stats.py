# SPDX-License-Identifier: Apache-2.0
"""``TransportStats``: the counters behind ``Transport.metrics()``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TransportStats:
    transfers_done: int = 0
    transfers_failed: int = 0
    transfers_cancelled: int = 0
    bytes_pulled: int = 0
    transfer_seconds: float = 0.0
    bytes_served: int = 0
    pulls_served: int = 0
    handshakes: int = 0
    handshake_seconds: float = 0.0
    handshakes_refused: int = 0
    protocol_errors: int = 0
    #: consumer: pulls whose landed bytes did not match the producer's digests
    checksum_failures: int = 0
    #: consumer: blocks verified, and the seconds verifying took
    blocks_verified: int = 0
    checksum_seconds: float = 0.0
    #: consumer: Release messages sent; producer: received
    releases_sent: int = 0
    releases_received: int = 0
    #: consumer: failed pulls by ``ErrorCode`` value ("timeout", "peer_gone"...)
    failures: dict = field(default_factory=dict)
    #: consumer: producer connections opened, by the medium their bytes move
    #: by ("tcp", "cma"...; what ``auto`` chose for each producer)
    media: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["gbps"] = self.bytes_pulled / self.transfer_seconds / 1e9 if self.transfer_seconds else 0
        return d
