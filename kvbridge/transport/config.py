# SPDX-License-Identifier: Apache-2.0
"""``TransportConfig``: the tunables every transport backend shares, with their defaults."""

from __future__ import annotations

import msgspec


class TransportConfig(msgspec.Struct, kw_only=True):
    """Tunables of every transport. Defaults in brackets.

    Attributes:
        host: address the producer's control listener binds ["127.0.0.1"].
        port: its port; 0 picks a free one [0].
        advertise_host: address consumers are told to dial [``host``].
        secret: shared secret for HMAC authentication; None reads
            ``$KVBRIDGE_SECRET``; unset means no authentication [None].
        lease_s: how long a published request's blocks wait for a consumer
            before they are freed anyway [120.0] (vLLM's NixlConnector waits
            480 s; a lease that ends under a read in progress is extended
            until the read finishes).
        handshake_timeout_s: connect + handshake deadline [20.0]. Generous on
            purpose: a producer on a loaded host can take seconds to answer,
            and failing a request that would have succeeded costs a whole
            prefill. A dead producer (connection refused) or a refusal fails
            at once; a connection reset mid-handshake is retried with backoff
            within this deadline.
        transfer_timeout_s: a transfer with no progress for this long fails
            [30.0].
        socket_buffer_bytes: SO_SNDBUF/SO_RCVBUF for data connections [4 MiB].
        publish_wait_s: how long a consumer keeps asking for a request the
            producer has not published yet [10.0] - the consumer can learn of
            a request (through the router) a moment before the producer's
            engine step publishes it.
        checksum: end-to-end KV checksums [True]: the producer digests each
            block when it publishes (``kvbridge.cache.checksum``), the consumer
            verifies the blocks it landed before the pull is DONE; a mismatch
            fails the pull (a load error for the engine). Host memory only.
        huge_pages: back the registered host KV memory with 2 MiB pages
            ["collapse"]: cross-process reads (cma, NIXL over shared memory)
            of it run ~3x faster. ``collapse`` converts memory already written
            on a background thread (``kvbridge.cache.hugepages``), ``advise``
            only advises the kernel, ``off`` leaves it alone.
        fault_flip_byte_every: fault injection for tests and ``bench chaos``
            [0 = off]: the consumer flips one byte of every Nth pull it lands,
            before verifying it.
    """

    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    secret: str | None = None
    lease_s: float = 120.0
    handshake_timeout_s: float = 20.0
    transfer_timeout_s: float = 30.0
    socket_buffer_bytes: int = 4 << 20
    publish_wait_s: float = 10.0
    checksum: bool = True
    huge_pages: str = "collapse"
    fault_flip_byte_every: int = 0
