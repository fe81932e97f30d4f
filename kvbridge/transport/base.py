# SPDX-License-Identifier: Apache-2.0
"""One transport interface; backends differ only in how bytes move.

A ``Transport`` is bound to one engine's registered KV memory (a
``PagedKVCache``) and plays both roles:

* **producer** (``server.ProducerSide``): ``publish(request_id, block_ids)``
  leases blocks for a consumer to read; ``serve()`` runs the control listener;
  ``poll_released()`` tells the engine which requests' blocks may be freed -
  because the consumer read them, because the lease expired, or because the
  engine released them.
* **consumer** (``client.ConsumerSide``): ``pull(peer, request_id, remote_ids,
  local_ids)`` returns a ``TransferHandle`` that moves through
  ``QUEUED -> HANDSHAKING -> TRANSFERRING -> DONE | FAILED | CANCELLED``.
* either: ``progress`` is an event set whenever a pull finishes or a lease is
  let go, so an engine with nothing else to do waits on it rather than polling.

The control connection (``kvbridge.protocol``) is common to every backend: it
authenticates, checks layouts on both sides before any KV byte moves, asks the
producer's permission for each read (so a lease can never expire under a read
in progress - a late read is refused, never served from freed blocks) and
reports completion. A backend overrides the hooks at the end of ``Transport``
(each says what it must do and on which thread); the essential four are
``_server_info``, ``_connect_data``, ``_send_pull`` and ``_receive_pull``.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable

from kvbridge import protocol as P
from kvbridge.cache import hugepages
from kvbridge.cache.blocks import PagedKVCache
from kvbridge.cache.shard import BlockSlice
from kvbridge.errors import ErrorCode
from kvbridge.transport.client import ConsumerSide
from kvbridge.transport.config import TransportConfig
from kvbridge.transport.handle import TransferHandle
from kvbridge.transport.leases import LeaseTable
from kvbridge.transport.peer import PeerConnection
from kvbridge.transport.server import ProducerSide, ServerConn
from kvbridge.transport.stats import TransportStats


class Transport(ProducerSide, ConsumerSide):
    """Base class of every backend (see the module docstring)."""

    #: registry name of the backend
    name = "base"
    #: the producers' transports (ticket / ``kv_transfer_params`` names) this
    #: consumer can read from besides its own: an ``auto`` producer serves tcp
    #: and cma consumers too
    reads_from: tuple[str, ...] = ()

    def __init__(self, cache: PagedKVCache, config: TransportConfig | None = None,
                 *, agent_name: str | None = None):
        self.cache = cache
        self.layout = cache.layout
        self.config = config or TransportConfig()
        self.agent_name = agent_name or f"kvbridge-{uuid.uuid4().hex[:8]}"
        #: this process's identity as a producer: a consumer holding a request
        #: of an earlier process on the same address fails it at once
        self.instance_id = uuid.uuid4().hex
        self._pulls_landed = 0
        self.secret = P.resolve_secret(self.config.secret)
        #: set whenever something an engine polls for happened - a lease let
        #: go (``poll_released``) or a pull finished - so an engine with nothing
        #: else to do can wait for it instead of polling in a loop
        self.progress = threading.Event()
        self.leases = LeaseTable(self.config.lease_s, on_release=self.progress.set)
        self.stats = TransportStats()
        #: producer: (request_id, Pull read, grant sent) of recent pulls, in
        #: ``time.perf_counter()`` seconds - the producer's share of a pull's
        #: fixed cost (``kvbridge bench transport`` reads it)
        self.serve_marks: deque[tuple[str, float, float]] = deque(maxlen=256)
        #: why recent consumers were refused (also logged), newest last
        self.refusals: deque[str] = deque(maxlen=32)
        self._xfer_ids = iter(range(1, 1 << 62))
        self._id_lock = threading.Lock()
        self._peers: dict[str, PeerConnection] = {}
        self._peers_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._server_threads: list[threading.Thread] = []
        self._server_conns: set[socket.socket] = set()
        self._closing = threading.Event()
        self._reaper: threading.Thread | None = None
        #: producer: called with a request's block ids before its first publish
        #: makes them readable (e.g. ``HostMirror.to_host``); raising refuses
        #: the publish
        self.before_publish: Callable[[list[int]], None] | None = None
        self._publish_lock = threading.Lock()
        #: producer: wake pipes (read end -> write end) of connections with
        #: parked pulls, written whenever ``publish_progress`` adds blocks
        self._parked_wakes: dict[int, int] = {}
        self._parked_lock = threading.Lock()
        #: consumer: called with a pull's local block ids once its bytes landed,
        #: before the handle is DONE (e.g. ``HostMirror.to_device``); raising
        #: fails the pull
        self.after_pull: Callable[[list[int]], None] | None = None
        #: the registered host memory going over to huge pages (in the background)
        self.huge_pages = hugepages.HugePages(hugepages.host_spans(cache),
                                              self.config.huge_pages).start()

    def _tune(self, sock: socket.socket) -> None:
        """Socket options of every control connection, either side."""
        P.tune_socket(sock, self.config.socket_buffer_bytes,
                      dead_peer_s=self.config.transfer_timeout_s)

    # ------------------------------------------------------------------ lifecycle
    def metrics(self) -> dict:
        out = self.stats.as_dict()
        out["held_requests"] = len(self.leases.held())
        out["refusals"] = list(self.refusals)
        out["transport"] = self.name
        out["huge_pages"] = self.huge_pages.status()
        return out

    def close(self) -> None:
        """Stop serving, fail in-flight pulls, free backend resources."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.huge_pages.stop()
        if self._listener is not None:
            try:
                # Wakes the accept thread. close() alone leaves the socket
                # listening, its port taken, until that accept() returns: a
                # transport reopened on the same port (sleep mode) could not bind.
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        for c in list(self._server_conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._peers_lock:
            peers = list(self._peers.values())
        for conn in peers:
            self._close_peer(conn, "transport closed", ErrorCode.TRANSFER)
        self._close_backend()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ backend hooks
    # Called by the producer side (``server.py``) and the consumer side
    # (``client.py``). The defaults suit a backend that moves no bytes of its own.

    def _start_producer(self) -> None:
        """Producer-side setup, once, when ``serve()`` first runs (register
        memory, start an agent...). Caller's thread."""

    def _server_info(self) -> dict:
        """What a consumer needs to reach this producer's memory (addresses,
        agent metadata), sent in ``HandshakeAccept.info``. Per-connection
        thread, for every accepted handshake: return fixed data."""
        return {}

    def _client_info(self) -> dict:
        """What the producer needs to know about this consumer (sent in the
        ``Handshake``). Consumer's connecting thread."""
        return {}

    def _serves(self, medium: str) -> bool:
        """Whether this producer serves a consumer asking for ``medium`` (the
        handshake's backend name). Per-connection thread."""
        return medium == self.name

    def _medium_for(self, conn: PeerConnection) -> str:
        """The medium this consumer asks ``conn``'s producer for. Consumer's
        connecting thread."""
        return self.name

    def pulls_from(self, transport: str) -> bool:
        """Whether this consumer can read from a producer of ``transport``
        (the name in its tickets / ``kv_transfer_params``)."""
        return transport == self.name or transport in self.reads_from

    def _server_accept_peer(self, info: dict, medium: str):
        """Per-connection producer state from the consumer's ``info`` and the
        ``medium`` it asked for; raise to refuse the consumer (the message is
        sent to it). Per-connection thread."""
        return None

    def _send_pull(self, conn: socket.socket, grant: P.PullGrant, ids: list[int],
                   state: ServerConn, block_slice: BlockSlice | None = None) -> None:
        """Producer side of a granted pull: send ``grant`` on ``conn`` and, for
        a backend that moves the bytes itself (TCP), the bytes of ``ids`` (only
        ``block_slice`` of each block when set); count ``stats.bytes_served``.
        Per-connection thread; the read is ended by the consumer's ReadDone."""
        raise NotImplementedError

    def _on_read_done(self, msg: P.ReadDone, state: ServerConn) -> None:
        """The producer saw a ReadDone (its lease is already updated): stats
        only. Per-connection thread."""

    def _server_conn_closed(self, state: ServerConn) -> None:
        """A consumer connection went away: drop what ``_server_accept_peer``
        or ``_send_pull`` kept for it. Per-connection thread, last call."""

    def _connect_data(self, conn: PeerConnection):
        """Prepare per-producer state once, from ``conn.remote_info`` and
        ``conn.remote_layout`` (descriptors, remote addresses); stored as
        ``conn.data``. Raise to fail the handshake. Consumer's connecting
        thread, with ``conn.send_lock`` held."""
        return None

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        """Consumer side of a granted pull: move the bytes into
        ``handle.local_ids`` (``handle.remote_slice``/``local_slice`` say which
        bytes of each block). True if they landed; False after
        ``handle._set_error(message, code)`` (or on a cancel: land nothing,
        keep the stream in sync). Raising fails the whole connection. The
        producer's reader thread: block only as long as the transfer runs."""
        raise NotImplementedError

    def _disconnect_data(self, conn: PeerConnection) -> None:
        """Free ``conn.data`` (the producer is gone or the transport closes);
        a read may still be running on the reader thread. Any thread."""

    def _close_backend(self) -> None:
        """Free backend resources at ``close()``, after every peer is closed.
        Caller's thread."""
