# SPDX-License-Identifier: Apache-2.0
"""One transport interface; backends differ only in how bytes move.

A ``Transport`` is bound to one engine's registered KV memory (a
``PagedKVCache``) and plays both roles:

* **producer**: ``publish(request_id, block_ids)`` leases blocks for a
  consumer to read; ``serve()`` runs the control listener; ``poll_released()``
  tells the engine which requests' blocks may be freed - because the consumer
  read them, because the lease expired, or because the engine released them.
* **consumer**: ``pull(peer, request_id, remote_ids, local_ids)`` returns a
  ``TransferHandle`` that moves through
  ``QUEUED -> HANDSHAKING -> TRANSFERRING -> DONE | FAILED | CANCELLED``.

The control connection (``kvbridge.protocol``) is common to every backend: it
authenticates, checks layouts on both sides before any KV byte moves, asks the
producer's permission for each read (so a lease can never expire under a read
in progress - a late read is refused, never served from freed blocks) and
reports completion. A backend implements four hooks:

* ``_server_info()``: what a consumer needs to reach this producer's memory
  (sent after the handshake succeeds);
* ``_connect_data(peer)``: prepare per-peer state once (descriptors, remote
  addresses) from that info;
* ``_send_pull(conn, grant, ids, state, block_slice)``: producer side of a
  granted pull (TCP sends the bytes here - only ``block_slice`` of each block
  when a consumer rank of another TP size reads its heads; others only grant);
* ``_receive_pull(peer, xfer, grant)``: consumer side: move the bytes (the
  handle's ``remote_slice``/``local_slice`` say which bytes of each block).
"""

from __future__ import annotations

import enum
import logging
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from kvbridge.cache import checksum
from kvbridge import protocol as P
from kvbridge.cache.blocks import BlockIdError, PagedKVCache
from kvbridge.errors import ErrorCode, TransferError, UnknownRequestError
from kvbridge.layout import KVLayout, LayoutMismatchError, check_pairable, layout_differences
from kvbridge.cache.shard import BlockSlice

logger = logging.getLogger("kvbridge.transport")

#: ``Handshake.backend`` of a control client (see ``ControlClient``).
CONTROL_BACKEND = "control"


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
        max_inflight: pulls queued per peer connection before ``pull`` blocks
            [64].
        publish_wait_s: how long a consumer keeps asking for a request the
            producer has not published yet [10.0] - the consumer can learn of
            a request (through the router) a moment before the producer's
            engine step publishes it.
        checksum: end-to-end KV checksums [True]: the producer digests each
            block when it publishes (``kvbridge.cache.checksum``), the consumer
            verifies the blocks it landed before the pull is DONE; a mismatch
            fails the pull (a load error for the engine). Host memory only.
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
    max_inflight: int = 64
    publish_wait_s: float = 10.0
    checksum: bool = True
    fault_flip_byte_every: int = 0


class TransferState(enum.Enum):
    QUEUED = "queued"
    HANDSHAKING = "handshaking"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED)


def _pairing_error(local: KVLayout, remote: KVLayout) -> LayoutMismatchError:
    """Why ``remote`` refused ``local``: ``check_pairable``'s error (with the
    reason a TP split is impossible), or every differing field."""
    try:
        check_pairable(local, remote)
    except LayoutMismatchError as e:
        return e
    return LayoutMismatchError(layout_differences(local, remote))


class TransferHandle:
    """A pull in progress: pollable (``state``), waitable and awaitable.

    ``await handle`` or ``handle.wait(timeout)`` return the final state;
    ``handle.result()`` raises ``TransferError`` unless it is DONE.
    """

    def __init__(self, xfer_id: int, peer: str, request_id: str, remote_ids: list[int],
                 local_ids: list[int], nbytes: int, remote_slice: BlockSlice | None = None,
                 local_slice: BlockSlice | None = None, readers: int = 1):
        self.xfer_id = xfer_id
        self.peer = peer
        self.request_id = request_id
        self.remote_ids = remote_ids
        self.local_ids = local_ids
        self.nbytes = nbytes
        #: the part of each remote block read, and of each local block written
        #: (a TP shard's heads, ``kvbridge.cache.shard``); None: whole blocks
        self.remote_slice = remote_slice
        self.local_slice = local_slice
        #: consumer ranks reading this request from this producer
        self.readers = readers
        self.state = TransferState.QUEUED
        self.error: str | None = None
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished_at: float | None = None
        self.cancel_requested = False
        #: blocks whose checksum did not match (a subset of ``local_ids``)
        self.invalid_local_ids: list[int] = []
        #: digests of ``local_ids`` a backend computed while the bytes landed
        #: (cache-warm); None: ``_verify`` reads the blocks again
        self.landed_digests: list[int] | None = None
        #: the producer process this pull is meant for (``Transport.instance_id``
        #: there): a restarted producer fails the pull at once
        self.producer_instance: str | None = None
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._cancel_cb = None

    def __repr__(self) -> str:
        return (f"TransferHandle(xfer={self.xfer_id}, req={self.request_id!r}, peer={self.peer}, "
                f"{self.state.value}" + (f", error={self.error!r}" if self.error else "") + ")")

    # -- state machine (transport side) --
    def _advance(self, state: TransferState, error: str | None = None) -> bool:
        with self._lock:
            if self.state.finished:
                return False
            self.state = state
            if state == TransferState.TRANSFERRING and self.started is None:
                self.started = time.monotonic()
            if state.finished:
                self.error = error
                self.finished_at = time.monotonic()
                self._event.set()
            return True

    # -- user side --
    def done(self) -> bool:
        return self.state.finished

    def wait(self, timeout: float | None = None) -> TransferState:
        self._event.wait(timeout)
        return self.state

    def result(self, timeout: float | None = None) -> None:
        if not self._event.wait(timeout):
            raise TimeoutError(f"transfer {self.xfer_id} still {self.state.value}")
        if self.state != TransferState.DONE:
            raise TransferError(f"transfer {self.xfer_id} of request {self.request_id!r} "
                                f"{self.state.value}: {self.error}")

    def __await__(self):
        import asyncio

        return asyncio.get_running_loop().run_in_executor(None, self.wait).__await__()

    def cancel(self) -> bool:
        """Ask to stop. True if no byte will be written to the local blocks
        (already CANCELLED); a transfer mid-flight stops at the next safe point
        and then turns CANCELLED."""
        self.cancel_requested = True
        if self.state == TransferState.QUEUED or self.state == TransferState.HANDSHAKING:
            self._advance(TransferState.CANCELLED, "cancelled before transfer")
        elif self._cancel_cb is not None and not self.state.finished:
            self._cancel_cb(self)
        return self.state == TransferState.CANCELLED

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None or self.started is None:
            return None
        return self.finished_at - self.started


# -- producer-side leases -------------------------------------------------------

@dataclass
class _Lease:
    request_id: str
    block_ids: list[int]
    expires: float
    readers: int = 0
    read: bool = False
    #: successful reads to wait for (several consumer TP ranks each read a
    #: slice), and those done
    reads_expected: int = 1
    reads_done: int = 0
    #: block id -> digest (``kvbridge.cache.checksum``), None when not checksummed
    digests: dict[int, int] | None = None


class LeaseTable:
    """Blocks a producer holds for consumers, and why each was let go.

    A request is released exactly once, with reason ``"read"``, ``"expired"``
    or ``"released"`` (the engine let go of it: aborted, or freed by hand).
    ``poll_released`` hands those events to the engine, which frees the blocks.
    """

    def __init__(self, lease_s: float):
        self.lease_s = lease_s
        self._leases: dict[str, _Lease] = {}
        self._events: deque[tuple[str, str]] = deque()
        #: recently ended requests -> reason, so a late read is told "gone",
        #: not "not yet published" (bounded: the oldest are forgotten)
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def publish(self, request_id: str, block_ids: Sequence[int],
                lease_s: float | None = None, digests: Sequence[int] | None = None) -> bool:
        """Hold ``block_ids``; False (and nothing changes) if the request is
        held already or has ended - a second publish of the same request (the
        scheduler's and the worker's) must never resurrect freed blocks."""
        with self._lock:
            held = self._leases.get(request_id)
            if held is not None:
                if held.block_ids != list(block_ids):
                    raise ValueError(f"request {request_id!r} is already published with "
                                     f"other blocks")
                return False
            if request_id in self._ended:
                return False
            self._leases[request_id] = _Lease(
                request_id, list(block_ids), time.monotonic() + (lease_s or self.lease_s),
                digests=None if digests is None else dict(zip(block_ids, digests)))
            return True

    def known(self, request_id: str) -> bool:
        """Whether ``request_id`` is held or has ended (a publish would be a no-op)."""
        with self._lock:
            return request_id in self._leases or request_id in self._ended

    def begin_read(self, request_id: str, block_ids: Sequence[int],
                   readers: int = 1) -> list[int]:
        """Grant a read of ``block_ids`` of ``request_id``; raises if not allowed.
        Returns the blocks' digests in that order (empty: not checksummed).
        ``readers``: consumer ranks that each read it once (the blocks are
        held until that many reads succeeded)."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                ended = self._ended.get(request_id)
                if ended:
                    raise UnknownRequestError(
                        f"unknown request id {request_id!r}: its blocks were already {ended}",
                        "ended")
                raise UnknownRequestError(f"unknown request id {request_id!r}: not published "
                                          "(yet?)", "not_published")
            allowed = set(lease.block_ids)
            stray = [b for b in block_ids if b not in allowed]
            if stray:
                raise BlockIdError(f"blocks {stray[:8]} are not published for request "
                                   f"{request_id!r}")
            lease.readers += 1
            lease.reads_expected = max(lease.reads_expected, readers)
            return [lease.digests[b] for b in block_ids] if lease.digests is not None else []

    def end_read(self, request_id: str, ok: bool) -> None:
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return
            lease.readers = max(0, lease.readers - 1)
            if ok:
                lease.reads_done += 1
                if lease.reads_done >= lease.reads_expected:
                    self._release_locked(request_id, "read")
            elif lease.readers == 0 and time.monotonic() >= lease.expires:
                self._release_locked(request_id, "expired")

    def release(self, request_id: str) -> bool:
        """The engine lets go (abort, or it is done); True if it was held."""
        with self._lock:
            if request_id not in self._leases:
                return False
            self._release_locked(request_id, "released")
            return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            for rid, lease in list(self._leases.items()):
                if lease.expires <= now and lease.readers == 0:
                    logger.warning("kvbridge: lease of request %s expired after %.1f s unread; "
                                   "releasing its %d blocks", rid, self.lease_s,
                                   len(lease.block_ids))
                    self._release_locked(rid, "expired")
                    out.append(rid)
        return out

    def _release_locked(self, request_id: str, reason: str) -> None:
        self._leases.pop(request_id, None)
        self._events.append((request_id, reason))
        self._ended[request_id] = {"read": "read", "expired": "expired by lease",
                                   "released": "released"}[reason]
        while len(self._ended) > 8192:
            self._ended.popitem(last=False)

    def poll(self) -> list[tuple[str, str]]:
        """(request_id, reason) released since the last poll."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    def held(self) -> dict[str, list[int]]:
        with self._lock:
            return {rid: list(lease.block_ids) for rid, lease in self._leases.items()}


class ControlClient:
    """Publishes a producer's finished requests straight to its transport's
    listener (same host), so blocks are readable before the engine's next step.

    Used by KVBridgeConnector's scheduler side. Failures are logged and the
    connection is retried on the next publish; the worker's own step-based
    publish stays as the fallback, so nothing depends on this path.
    """

    def __init__(self, address: str, layout: KVLayout, secret: bytes | None,
                 timeout_s: float = 2.0):
        self.address = address
        self.layout = layout
        self.secret = secret
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def publish(self, request_id: str, block_ids: Sequence[int],
                num_tokens: int | None = None) -> bool:
        msg = P.Publish(request_id, [int(b) for b in block_ids], num_tokens)
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._connect()
                    P.send_message(self._sock, msg)
                    return True
                except (OSError, P.ProtocolError, P.PeerRefused) as e:
                    self.close_locked()
                    if attempt == 2:
                        logger.warning("kvbridge: control publish of %s to %s failed: %s "
                                       "(the worker publishes at its next step)", request_id,
                                       self.address, e)
        return False

    def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            P.client_handshake(sock, self.layout, CONTROL_BACKEND, self.secret, {},
                               "control")
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def close_locked(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


# -- metrics ------------------------------------------------------------------------

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
    failures: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["gbps"] = self.bytes_pulled / self.transfer_seconds / 1e9 if self.transfer_seconds else 0
        return d


# -- the control channel ---------------------------------------------------------------

@dataclass
class ServerConn:
    """Producer side of one consumer connection."""

    sock: socket.socket
    peer: str
    #: reads granted and not yet confirmed: xfer_id -> request_id. Ended (not
    #: as read) if the connection drops, so a dead consumer strands nothing.
    granted: dict = field(default_factory=dict)
    #: whatever the backend keeps per consumer
    backend: object = None
    #: a control client (the producer's scheduler): may only Publish
    control: bool = False
    #: the consumer's layout was refused: it may only Release
    refused: bool = False


class PeerConnection:
    """Consumer side of one producer: a handshaken control connection plus
    backend state prepared once (``data``)."""

    def __init__(self, address: str):
        self.address = address
        self.sock: socket.socket | None = None
        self.remote_layout: KVLayout | None = None
        self.remote_info: dict = {}
        self.data: object = None
        self.inflight: deque[TransferHandle] = deque()
        self.send_lock = threading.Lock()
        self.ready = threading.Event()
        self.error: str | None = None
        self.closed = False
        self.reader: threading.Thread | None = None
        #: the producer refused our layout: every pull fails at once with this
        #: (the connection stays open so we can tell it what to drop)
        self.refusal: LayoutMismatchError | None = None
        #: the producer process's identity (``Transport.instance_id`` there)
        self.instance: str | None = None


class Transport:
    """Base class of every backend (see the module docstring)."""

    #: registry name of the backend
    name = "base"

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
        self.leases = LeaseTable(self.config.lease_s)
        self.stats = TransportStats()
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
        #: consumer: called with a pull's local block ids once its bytes landed,
        #: before the handle is DONE (e.g. ``HostMirror.to_device``); raising
        #: fails the pull
        self.after_pull: Callable[[list[int]], None] | None = None

    # ------------------------------------------------------------------ producer
    @property
    def address(self) -> str:
        """``host:port`` consumers dial (after ``serve()``)."""
        if self._listener is None:
            raise RuntimeError("serve() first")
        host = self.config.advertise_host or self.config.host
        return f"{host}:{self._listener.getsockname()[1]}"

    def serve(self) -> str:
        """Start the control listener (idempotent); returns ``address``."""
        if self._listener is not None:
            return self.address
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        sock.listen(128)
        self._listener = sock
        t = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        t.start()
        self._server_threads.append(t)
        self._reaper = threading.Thread(target=self._reap_loop, name=f"{self.name}-leases",
                                        daemon=True)
        self._reaper.start()
        self._start_producer()
        return self.address

    def publish(self, request_id: str, block_ids: Sequence[int], *,
                num_tokens: int | None = None, lease_s: float | None = None) -> bool:
        """Hold ``block_ids`` of ``request_id`` for a consumer to read; False if
        it is held already or has ended (idempotent)."""
        ids = self.cache.validate(block_ids, num_tokens)
        # Serialized, so the scheduler's publish and the worker's of the same
        # request (arriving together) stage and digest the blocks once.
        with self._publish_lock:
            if self.leases.known(request_id):
                return self.leases.publish(request_id, ids, lease_s)
            if self.before_publish is not None:
                self.before_publish(ids)
            digests = (checksum.block_digests(self.cache, ids)
                       if self.config.checksum and checksum.supported(self.cache) else None)
            return self.leases.publish(request_id, ids, lease_s, digests)

    def release(self, request_id: str) -> bool:
        """Stop holding a request's blocks (abort); True if they were held."""
        return self.leases.release(request_id)

    def poll_released(self) -> list[tuple[str, str]]:
        """(request_id, reason) whose blocks the engine may now free."""
        self.leases.expire()
        return self.leases.poll()

    def _reap_loop(self) -> None:
        while not self._closing.wait(0.5):
            self.leases.expire()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError:
                return
            self._tune(conn)
            self._server_conns.add(conn)
            t = threading.Thread(target=self._serve_conn, args=(conn, addr),
                                 name=f"{self.name}-conn-{addr[1]}", daemon=True)
            t.start()

    def _tune(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, self.config.socket_buffer_bytes)
            except OSError:
                pass

    def _serve_conn(self, conn: socket.socket, addr) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        state = ServerConn(conn, peer)
        try:
            conn.settimeout(self.config.handshake_timeout_s)
            if not self._server_handshake(conn, peer, state):
                return
            # Idle consumers may wait between pulls (blocking recv), but one
            # that stops reading mid-transfer must not hold this thread and
            # its leases forever: sends time out.
            conn.settimeout(None)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", int(self.config.transfer_timeout_s), 0))
            while not self._closing.is_set():
                msg = P.recv_message(conn)
                if isinstance(msg, P.Release) and not state.control:
                    self._handle_release(msg, peer)
                elif state.refused:
                    raise P.ProtocolError(f"a refused consumer may only Release, got "
                                          f"{type(msg).__name__}")
                elif state.control:
                    if not isinstance(msg, P.Publish):
                        raise P.ProtocolError(f"a control connection may only Publish, got "
                                              f"{type(msg).__name__}")
                    self._handle_publish(msg)
                elif isinstance(msg, P.Pull):
                    self._handle_pull(conn, msg, state)
                elif isinstance(msg, P.ReadDone):
                    request_id = state.granted.pop(msg.xfer_id, None)
                    if request_id is None:
                        raise P.ProtocolError(f"ReadDone for transfer {msg.xfer_id}, which "
                                              "was never granted")
                    self.leases.end_read(request_id, msg.ok)
                    self._on_read_done(msg, state)
                else:
                    raise P.ProtocolError(f"unexpected {type(msg).__name__} after handshake")
        except P.PeerClosed:
            pass
        except (P.ProtocolError, socket.timeout) as e:
            self.stats.protocol_errors += 1
            logger.warning("kvbridge: closing connection from %s: %s", peer, e)
            self._try_send(conn, P.Error("protocol", str(e)))
        except OSError as e:
            if not self._closing.is_set():
                logger.info("kvbridge: connection from %s ended: %s", peer, e)
        except Exception as e:  # noqa: BLE001 - one bad peer never kills the listener
            self.stats.protocol_errors += 1
            logger.exception("kvbridge: closing connection from %s after an internal error",
                             peer)
            self._try_send(conn, P.Error("internal", f"{type(e).__name__}: {e}"[:500]))
        finally:
            for request_id in state.granted.values():
                self.leases.end_read(request_id, ok=False)
            self._server_conns.discard(conn)
            self._server_conn_closed(state)
            conn.close()

    def _try_send(self, conn: socket.socket, msg: P.Message) -> None:
        try:
            P.send_message(conn, msg)
        except OSError:
            pass

    def _server_handshake(self, conn: socket.socket, peer: str, state: ServerConn) -> bool:
        hello = P.recv_message(conn, P.MAX_HANDSHAKE_BYTES)
        if not isinstance(hello, P.Hello):
            raise P.ProtocolError(f"expected Hello, got {type(hello).__name__}")
        if hello.protocol_version != P.PROTOCOL_VERSION:
            msg = (f"unsupported protocol version {hello.protocol_version}; this producer "
                   f"speaks {P.PROTOCOL_VERSION}")
            self._refuse(peer, msg)
            self._try_send(conn, P.Error("version", msg))
            return False
        nonce = P.new_nonce()
        P.send_message(conn, P.Challenge(P.PROTOCOL_VERSION, nonce, self.secret is not None))
        hs = P.recv_message(conn, P.MAX_HANDSHAKE_BYTES)
        if not isinstance(hs, P.Handshake):
            raise P.ProtocolError(f"expected Handshake, got {type(hs).__name__}")
        if not P.verify_mac(self.secret, hs.mac, b"client", nonce, hello.nonce):
            self._refuse(peer, "authentication failed")
            # Say nothing about ourselves: no layout, no backend info.
            self._try_send(conn, P.Error("auth", "authentication failed: wrong or missing "
                                                 "shared secret"))
            return False
        state.control = hs.backend == CONTROL_BACKEND
        if hs.backend != self.name and not state.control:
            msg = f"consumer uses transport {hs.backend!r}, this producer serves {self.name!r}"
            self._refuse(peer, msg)
            self._try_send(conn, P.Error("backend", msg))
            return False
        try:
            check_pairable(self.layout, hs.layout)
        except LayoutMismatchError as e:
            self._refuse(peer, str(e))
            self._try_send(conn, P.Error("layout", str(e), layout=self.layout))
            # Authenticated but incompatible: keep the connection for Release
            # only, so the consumer can hand back what it will never read.
            state.refused = not state.control
            return state.refused
        try:
            # A control client moves no bytes: no per-consumer backend state.
            state.backend = None if state.control else self._server_accept_peer(hs.info)
        except Exception as e:  # backend refused (e.g. not the same host)
            self._refuse(peer, str(e))
            self._try_send(conn, P.Error("backend", str(e)))
            return False
        P.send_message(conn, P.HandshakeAccept(self.layout, P.mac(self.secret, b"server",
                                                                   hello.nonce, nonce),
                                               {**self._server_info(),
                                                "instance": self.instance_id}))
        return True

    def _handle_release(self, msg: P.Release, peer: str) -> None:
        self.stats.releases_received += 1
        if self.leases.release(msg.request_id):
            logger.info("kvbridge: consumer %s released request %s unread (%s)", peer,
                        msg.request_id, msg.reason or "no reason given")

    def _handle_publish(self, msg: P.Publish) -> None:
        try:
            self.publish(msg.request_id, msg.block_ids, num_tokens=msg.num_tokens)
        except ValueError as e:  # bad ids: the worker's own publish will say why
            logger.warning("kvbridge: control Publish of %s refused: %s", msg.request_id, e)
        except Exception as e:  # noqa: BLE001 - a failed before_publish hook (staging)
            logger.error("kvbridge: control Publish of %s failed: %s", msg.request_id, e)

    def _refuse(self, peer: str, reason: str) -> None:
        self.stats.handshakes_refused += 1
        self.refusals.append(reason)
        logger.error("kvbridge: refusing consumer %s: %s", peer, reason)

    def _handle_pull(self, conn: socket.socket, pull: P.Pull, state: ServerConn) -> None:
        if pull.xfer_id in state.granted:
            raise P.ProtocolError(f"transfer id {pull.xfer_id} is already in flight")
        try:
            ids = self.cache.validate(pull.block_ids)
            sl = None
            if pull.slice is not None:
                try:
                    sl = BlockSlice(*pull.slice)
                    sl.check(self.layout.block_bytes)
                except (TypeError, ValueError) as e:
                    raise BlockIdError(f"bad block slice {pull.slice}: {e}") from None
                if sl.is_whole(self.layout.block_bytes):
                    sl = None
            digests = self.leases.begin_read(pull.request_id, ids, max(1, pull.readers))
        except UnknownRequestError as e:
            if e.code != "not_published":
                logger.warning("kvbridge: refusing pull %d: %s", pull.xfer_id, e.args[0])
            P.send_message(conn, P.PullError(pull.xfer_id, e.args[0], e.code))
            return
        except BlockIdError as e:
            logger.warning("kvbridge: refusing pull %d: %s", pull.xfer_id, e)
            P.send_message(conn, P.PullError(pull.xfer_id, str(e), "blocks"))
            return
        self.stats.pulls_served += 1
        state.granted[pull.xfer_id] = pull.request_id
        if sl is not None and digests:
            # Published digests cover whole blocks: digest the slice sent.
            digests = checksum.block_digests(self.cache, ids, sl)
        grant = P.PullGrant(pull.xfer_id, self.cache.staging_bytes(len(ids), sl), digests)
        self._send_pull(conn, grant, ids, state, sl)

    # ------------------------------------------------------------------ consumer
    def pull(self, peer: str, request_id: str, remote_block_ids: Sequence[int],
             local_block_ids: Sequence[int], *,
             producer_instance: str | None = None,
             remote_slice: BlockSlice | None = None, local_slice: BlockSlice | None = None,
             readers: int = 1) -> TransferHandle:
        """Start reading ``remote_block_ids`` of ``request_id`` on ``peer`` into
        ``local_block_ids`` here. Never blocks on the network.

        ``producer_instance``: the producer process the request was published
        by (its ``instance_id``, carried in the ticket); if another process
        now serves that address (a restart), the pull fails at once.

        Tensor parallelism (``kvbridge.cache.shard.plan_reads`` gives all three):
        ``remote_slice`` reads only those bytes of each remote block,
        ``local_slice`` writes only those bytes of each local block, and
        ``readers`` tells the producer how many consumer ranks read this
        request from it (it holds the blocks until all have)."""
        local = self.cache.validate(local_block_ids, what="local block ids")
        if local_slice is not None:
            local_slice.check(self.layout.block_bytes)
            if local_slice.is_whole(self.layout.block_bytes):
                local_slice = None
        remote = [int(b) for b in remote_block_ids]
        if len(remote) != len(local):
            raise BlockIdError(f"{len(remote)} remote block ids but {len(local)} local ones")
        with self._id_lock:
            xfer_id = next(self._xfer_ids)
        handle = TransferHandle(xfer_id, peer, request_id, remote, local,
                                self.cache.staging_bytes(len(local), local_slice),
                                remote_slice, local_slice, max(1, int(readers)))
        handle.producer_instance = producer_instance
        handle._cancel_cb = self._on_cancel
        conn = self._peer(peer)
        if conn.ready.is_set() and not conn.closed:
            # Connected already: sending the small Pull inline costs less than a
            # thread hop (the reply arrives on the peer's reader thread).
            self._submit(handle)
        else:
            threading.Thread(target=self._submit, args=(handle,), daemon=True,
                             name=f"{self.name}-pull-{xfer_id}").start()
        return handle

    def handshake(self, peer: str) -> KVLayout:
        """Connect and handshake with ``peer`` now (else the first pull does);
        returns the remote layout or raises (``LayoutMismatchError``, ...)."""
        conn = self._peer(peer)
        self._ensure_connected(conn)
        if conn.refusal is not None:
            raise conn.refusal
        if conn.error or conn.remote_layout is None:
            raise TransferError(conn.error or f"no connection to {peer}")
        return conn.remote_layout

    def _peer(self, address: str) -> PeerConnection:
        with self._peers_lock:
            conn = self._peers.get(address)
            if conn is None or conn.closed:
                conn = PeerConnection(address)
                self._peers[address] = conn
            return conn

    def _submit(self, handle: TransferHandle) -> None:
        conn = self._peer(handle.peer)
        if not conn.ready.is_set():
            handle._advance(TransferState.HANDSHAKING)
        try:
            self._ensure_connected(conn)
        except Exception as e:  # noqa: BLE001 - reported through the handle
            self._fail(handle, f"{e}")
            return
        if conn.error:
            self._fail(handle, conn.error)
            return
        if conn.refusal is not None:
            # Refused at the handshake: fail now, and let the producer drop it.
            self._send_release(conn, handle.request_id, "layout refused")
            self._fail(handle, f"handshake with {conn.address} refused: {conn.refusal}")
            return
        if (handle.producer_instance and conn.instance
                and handle.producer_instance != conn.instance):
            self._fail(handle, f"producer at {conn.address} restarted: request "
                               f"{handle.request_id!r} belonged to its previous process, "
                               "whose blocks are gone")
            return
        if handle.state.finished:  # cancelled while connecting
            return
        remote_bytes = (handle.remote_slice.nbytes() if handle.remote_slice is not None
                        else conn.remote_layout.block_bytes if conn.remote_layout else None)
        local_bytes = handle.nbytes // max(1, len(handle.local_ids) * self.layout.num_regions)
        if handle.local_ids and remote_bytes is not None and remote_bytes != local_bytes:
            self._fail(handle, f"the producer at {conn.address} has {remote_bytes} bytes per "
                               f"block and region to read, {local_bytes} are written here "
                               "(a TP slice that does not fit)")
            return
        with conn.send_lock:
            if conn.closed:
                self._fail(handle, conn.error or "connection closed")
                return
            handle._advance(TransferState.TRANSFERRING)
            conn.inflight.append(handle)
            try:
                P.send_message(conn.sock, self._pull_message(handle))
            except OSError as e:
                self._close_peer(conn, f"send to producer {conn.address} failed: {e}")

    @staticmethod
    def _pull_message(handle: TransferHandle) -> P.Pull:
        sl = handle.remote_slice
        return P.Pull(handle.xfer_id, handle.request_id, handle.remote_ids,
                      None if sl is None else [sl.offset, sl.length, sl.rows], handle.readers)

    def _resend(self, conn: PeerConnection, handle: TransferHandle) -> None:
        with conn.send_lock:
            if conn.closed:
                pending = True
            else:
                pending = False
                conn.inflight.append(handle)
                try:
                    P.send_message(conn.sock, self._pull_message(handle))
                except OSError:
                    pass  # the reader sees the broken connection and fails it
        if pending:
            self._fail(handle, conn.error or "connection closed")

    def _ensure_connected(self, conn: PeerConnection) -> None:
        with conn.send_lock:
            if conn.ready.is_set():
                return
            t0 = time.monotonic()
            try:
                self._client_handshake(conn)
            except Exception as e:
                refused = isinstance(e, LayoutMismatchError)
                conn.error = f"handshake with {conn.address} {'refused' if refused else 'failed'}: {e}"
                # Forget the connection: a later pull shakes hands afresh (the
                # producer may come back, or with a fixed layout).
                conn.closed = True
                conn.ready.set()
                with self._peers_lock:
                    if self._peers.get(conn.address) is conn:
                        del self._peers[conn.address]
                logger.error("kvbridge: %s", conn.error)
                if conn.sock is not None:
                    conn.sock.close()
                if refused:
                    raise
                raise TransferError(conn.error) from e
            if conn.refusal is not None:
                self.stats.handshakes_refused += 1
                logger.error("kvbridge: handshake with %s refused: %s", conn.address,
                             conn.refusal)
            else:
                self.stats.handshakes += 1
                self.stats.handshake_seconds += time.monotonic() - t0
            conn.reader = threading.Thread(target=self._reader_loop, args=(conn,), daemon=True,
                                           name=f"{self.name}-reader-{conn.address}")
            conn.reader.start()
            conn.ready.set()

    def _client_handshake(self, conn: PeerConnection) -> None:
        """Connect and handshake, retrying a reset connection with backoff until
        ``handshake_timeout_s``; a refused connection (nobody listens: the
        producer is dead) and a refusal by the producer fail at once."""
        deadline = time.monotonic() + self.config.handshake_timeout_s
        delay = 0.05
        while True:
            try:
                return self._client_handshake_once(conn, deadline)
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
                    P.PeerClosed) as e:
                if conn.sock is not None:
                    conn.sock.close()
                    conn.sock = None
                if time.monotonic() + delay >= deadline or self._closing.is_set():
                    raise TransferError(f"connection reset during the handshake: {e}") from e
                logger.info("kvbridge: handshake with %s: %s; retrying in %.2f s",
                            conn.address, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _client_handshake_once(self, conn: PeerConnection, deadline: float) -> None:
        host, _, port = conn.address.rpartition(":")
        sock = socket.create_connection((host, int(port)),
                                        timeout=max(0.1, deadline - time.monotonic()))
        conn.sock = sock
        self._tune(sock)
        try:
            reply = P.client_handshake(sock, self.layout, self.name, self.secret,
                                       self._client_info(), self.agent_name)
        except P.PeerRefused as e:
            err = e.error
            if err.code == "layout" and err.layout is not None:
                # The producer keeps this connection open for Release only.
                conn.refusal = _pairing_error(self.layout, err.layout)
                sock.settimeout(min(1.0, self.config.transfer_timeout_s))
                return
            if err.code == "auth":
                raise TransferError(err.message if "secret" in err.message
                                    else f"producer refused: {err.message}") from None
            raise TransferError(f"producer refused: {err.message}") from None
        check_pairable(self.layout, reply.layout)
        conn.remote_layout = reply.layout
        conn.remote_info = reply.info
        conn.instance = reply.info.get("instance")
        conn.data = self._connect_data(conn)
        sock.settimeout(min(1.0, self.config.transfer_timeout_s))

    def _reader_loop(self, conn: PeerConnection) -> None:
        sock = conn.sock
        assert sock is not None
        reason = "connection closed"
        try:
            while not conn.closed:
                try:
                    msg = P.recv_message(sock)
                except socket.timeout:
                    self._check_stalled(conn)
                    continue
                if isinstance(msg, (P.PullGrant, P.PullError)):
                    handle = self._pop_inflight(conn, msg.xfer_id)
                    if isinstance(msg, P.PullError):
                        if (msg.code == "not_published" and not handle.cancel_requested
                                and time.monotonic() - handle.created
                                < self.config.publish_wait_s):
                            # The producer's engine has not published it yet: ask again.
                            threading.Timer(0.01, self._resend, (conn, handle)).start()
                            continue
                        if msg.code != "ended" and not handle.cancel_requested:
                            # It may still hold the blocks (bad ids, or not yet
                            # published): this consumer will not ask again.
                            self._send_release(conn, handle.request_id, "pull refused")
                        if handle.cancel_requested:
                            handle._advance(TransferState.CANCELLED, "cancelled")
                            continue
                        self._fail(handle, f"producer refused the pull: {msg.message}")
                        continue
                    ok = self._receive_pull(conn, handle, msg)
                    self._finish_read(conn, handle, ok, msg)
                elif isinstance(msg, P.Error):
                    raise TransferError(f"producer error ({msg.code}): {msg.message}")
                else:
                    raise P.ProtocolError(f"unexpected {type(msg).__name__} from producer")
        except P.PeerClosed as e:
            reason = f"producer {conn.address} closed the connection ({e})"
        except (P.ProtocolError, TransferError, OSError) as e:
            reason = f"connection to producer {conn.address} failed: {e}"
        except Exception as e:  # noqa: BLE001 - fail the pulls, never hang them
            logger.exception("kvbridge: reader for %s failed", conn.address)
            reason = f"connection to producer {conn.address} failed: {type(e).__name__}: {e}"
        finally:
            self._close_peer(conn, reason)

    def _check_stalled(self, conn: PeerConnection) -> None:
        if conn.inflight:
            oldest = conn.inflight[0]
            since = oldest.started or oldest.created
            if time.monotonic() - since > self.config.transfer_timeout_s:
                raise TransferError(f"no progress for {self.config.transfer_timeout_s:.0f} s "
                                    "(producer hung?)")

    def _pop_inflight(self, conn: PeerConnection, xfer_id: int) -> TransferHandle:
        with conn.send_lock:
            if not conn.inflight or conn.inflight[0].xfer_id != xfer_id:
                raise P.ProtocolError(f"reply for unknown transfer {xfer_id}")
            return conn.inflight.popleft()

    def _finish_read(self, conn: PeerConnection, handle: TransferHandle, ok: bool,
                     grant: P.PullGrant) -> None:
        cancelled = handle.cancel_requested and not ok
        if ok:
            ok = self._verify(handle, grant)
        with conn.send_lock:
            try:
                P.send_message(conn.sock, P.ReadDone(handle.xfer_id, handle.request_id, ok))
            except OSError:
                pass
        if not ok and not cancelled:
            # A failed pull is final: hand the request back so the producer
            # frees it now. (A cancel is not: the caller may pull again, or
            # release it with ``release_remote``.)
            self._send_release(conn, handle.request_id, handle.error or "failed")
        if ok and self.after_pull is not None:
            try:
                self.after_pull(list(handle.local_ids))
            except Exception as e:  # noqa: BLE001 - fail this pull, not the reader thread
                self._fail(handle, f"after_pull hook failed: {e}")
                return
        if ok:
            self.stats.transfers_done += 1
            self.stats.bytes_pulled += handle.nbytes
            handle._advance(TransferState.DONE)
            if handle.duration_s:
                self.stats.transfer_seconds += handle.duration_s
        elif cancelled:
            self.stats.transfers_cancelled += 1
            handle._advance(TransferState.CANCELLED, "cancelled during transfer")
        else:
            self._fail(handle, handle.error or "transfer failed")

    def _verify(self, handle: TransferHandle, grant: P.PullGrant) -> bool:
        """Check the landed blocks against the producer's digests (and inject
        a flipped byte first when ``fault_flip_byte_every`` says so)."""
        self._pulls_landed += 1
        every = self.config.fault_flip_byte_every
        if every and self._pulls_landed % every == 0 and handle.local_ids:
            checksum.flip_byte(self.cache, handle.local_ids[0],
                               handle.local_slice.offset if handle.local_slice else 0)
            handle.landed_digests = None  # the flip came "in flight": digest again
            logger.warning("kvbridge: fault injection: flipped a byte of block %d (pull %d of "
                           "request %s)", handle.local_ids[0], handle.xfer_id, handle.request_id)
        if not self._verifies(grant):
            return True
        if len(grant.checksums) != len(handle.local_ids):
            handle.error = (f"producer sent {len(grant.checksums)} checksums for "
                            f"{len(handle.local_ids)} blocks")
            handle.invalid_local_ids = list(handle.local_ids)
            return False
        t0 = time.perf_counter()
        got = handle.landed_digests or checksum.block_digests(self.cache, handle.local_ids,
                                                              handle.local_slice)
        bad = [b for b, g, e in zip(handle.local_ids, got, grant.checksums) if g != e]
        self.stats.checksum_seconds += time.perf_counter() - t0
        self.stats.blocks_verified += len(handle.local_ids)
        if not bad:
            return True
        self.stats.checksum_failures += 1
        handle.invalid_local_ids = bad
        handle.error = (f"checksum mismatch: {len(bad)} of {len(handle.local_ids)} blocks "
                        f"landed corrupted (local blocks {bad[:8]})")
        return False

    def _verifies(self, grant: P.PullGrant) -> bool:
        """Whether this pull's landed bytes are checked against digests."""
        return bool(self.config.checksum and grant.checksums
                    and checksum.supported(self.cache))

    def _send_release(self, conn: PeerConnection, request_id: str, reason: str) -> None:
        """Tell the producer we will not read ``request_id`` (best effort: if
        the connection is gone, its lease frees the blocks)."""
        with conn.send_lock:
            if conn.closed or conn.sock is None:
                return
            try:
                P.send_message(conn.sock, P.Release(request_id, reason[:200]))
                self.stats.releases_sent += 1
            except OSError:
                pass

    def release_remote(self, peer: str, request_id: str, reason: str = "") -> None:
        """Tell the producer at ``peer`` that ``request_id`` will not be read
        here, so it frees the blocks now (an aborted request, a full local
        prefix hit). Never blocks; failures are logged."""
        def run():
            conn = self._peer(peer)
            try:
                self._ensure_connected(conn)
            except Exception as e:  # noqa: BLE001 - best effort; the lease frees it
                logger.info("kvbridge: cannot release %s at %s: %s", request_id, peer, e)
                return
            self._send_release(conn, request_id, reason)

        conn = self._peer(peer)
        if conn.ready.is_set():
            self._send_release(conn, request_id, reason)
        else:
            threading.Thread(target=run, daemon=True, name=f"{self.name}-release").start()

    def _fail(self, handle: TransferHandle, reason: str) -> None:
        if handle._advance(TransferState.FAILED, reason):
            self.stats.transfers_failed += 1
            kind = reason.split(":")[0][:60]
            self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
            logger.warning("kvbridge: pull %d of request %s from %s failed: %s", handle.xfer_id,
                           handle.request_id, handle.peer, reason)

    def _close_peer(self, conn: PeerConnection, reason: str) -> None:
        with conn.send_lock:
            if conn.closed and not conn.inflight:
                return
            conn.closed = True
            conn.error = conn.error or reason
            pending = list(conn.inflight)
            conn.inflight.clear()
        # Forget the peer and free its resources before failing the handles,
        # so whoever sees FAILED also sees nothing left held for that peer.
        with self._peers_lock:
            if self._peers.get(conn.address) is conn:
                del self._peers[conn.address]
        if conn.sock is not None:
            try:
                conn.sock.close()
            except OSError:
                pass
        self._disconnect_data(conn)
        for h in pending:
            self._fail(h, reason)

    def _on_cancel(self, handle: TransferHandle) -> None:
        """Default: a transfer mid-flight finishes into scratch space (see backends)."""

    # ------------------------------------------------------------------ lifecycle
    def metrics(self) -> dict:
        out = self.stats.as_dict()
        out["held_requests"] = len(self.leases.held())
        out["refusals"] = list(self.refusals)
        out["transport"] = self.name
        return out

    def close(self) -> None:
        """Stop serving, fail in-flight pulls, free backend resources."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        for c in list(self._server_conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._peers_lock:
            peers = list(self._peers.values())
        for conn in peers:
            self._close_peer(conn, "transport closed")
        self._close_backend()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ backend hooks
    def _start_producer(self) -> None:
        """Producer-side setup once ``serve()`` runs (register memory, ...)."""

    def _server_info(self) -> dict:
        return {}

    def _client_info(self) -> dict:
        return {}

    def _server_accept_peer(self, info: dict):
        """Per-connection producer state from the consumer's info; raise to refuse."""
        return None

    def _send_pull(self, conn: socket.socket, grant: P.PullGrant, ids: list[int],
                   state: ServerConn, block_slice: BlockSlice | None = None) -> None:
        """Send ``grant`` (and, for TCP, the bytes of ``ids``)."""
        raise NotImplementedError

    def _on_read_done(self, msg: P.ReadDone, state: ServerConn) -> None:
        """Producer saw a ReadDone (stats)."""

    def _server_conn_closed(self, state: ServerConn) -> None:
        """A consumer connection went away (backend cleanup)."""

    def _connect_data(self, conn: PeerConnection):
        return None

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        raise NotImplementedError

    def _disconnect_data(self, conn: PeerConnection) -> None:
        pass

    def _close_backend(self) -> None:
        pass
