# SPDX-License-Identifier: Apache-2.0
"""The producer side of every transport: the control listener (accept,
handshake), publishing and leasing blocks, and granting each consumer's pulls.

``ProducerSide`` is a mixin of ``Transport``; it uses the state ``Transport``
sets up (``config``, ``leases``, ``stats``...) and calls its backend hooks."""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvbridge import protocol as P
from kvbridge.cache import checksum
from kvbridge.cache.blocks import BlockIdError
from kvbridge.cache.shard import BlockSlice
from kvbridge.errors import UnknownRequestError
from kvbridge.layout import LayoutMismatchError, check_pairable

logger = logging.getLogger("kvbridge.transport")

#: ``Handshake.backend`` of a control client (see ``kvbridge.vllm.control``).
CONTROL_BACKEND = "control"


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
    #: what the consumer asked this producer to move its bytes by ("tcp"...)
    medium: str = ""
    #: positional pulls of blocks not computed yet (a streamed request):
    #: (Pull, deadline), each granted once ``publish_progress`` added its blocks
    parked: list = field(default_factory=list)
    #: granted reads of part of a request (not its reader's last): their
    #: ReadDone does not let the blocks go
    partial: set = field(default_factory=set)
    #: read end of a pipe ``publish_progress`` writes to while pulls are parked
    wake: int | None = None


class ProducerSide:
    """Serve, publish, release, and answer consumers (a ``Transport`` mixin)."""

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
            return self.leases.publish(request_id, ids, lease_s, self._make_readable(ids))

    def publish_progress(self, request_id: str, block_ids: Sequence[int], *,
                         complete: bool, lease_s: float | None = None) -> bool:
        """Streaming: hold the blocks of ``request_id`` computed so far (every
        one, in request order; each call extends the last) while its prefill
        still runs; ``complete`` once the last block is in. Consumers read it
        by position (``pull(..., positions=True)``): a pull of blocks not in
        yet waits at this producer and is granted the moment they are. False
        if the request has ended (a consumer gave it up)."""
        ids = self.cache.validate(block_ids)
        with self._publish_lock:
            held = self.leases.num_held(request_id)
            if not held and self.leases.known(request_id):
                return False  # ended (a consumer gave it up): stage nothing
            new = ids[held:]
            digests = self._make_readable(new) if new else None
            ok = self.leases.advance(request_id, ids, complete, lease_s, digests)
        if ok and new:
            self._wake_parked()
        return ok

    def _make_readable(self, ids: list[int]) -> list[int] | None:
        """Stage ``ids`` for reading (``before_publish``: a host mirror) and
        digest them; None when not checksummed."""
        if self.before_publish is not None:
            self.before_publish(ids)
        return (checksum.block_digests(self.cache, ids)
                if self.config.checksum and checksum.supported(self.cache) else None)

    def _wake_parked(self) -> None:
        # Under the lock: a pipe closed meanwhile could see its fd number
        # reused by a socket, which must never get this byte.
        with self._parked_lock:
            for fd in self._parked_wakes.values():
                try:
                    os.write(fd, b"x")
                except BlockingIOError:
                    pass  # full: a wake is pending anyway

    def release(self, request_id: str, *, before_publish: bool = False) -> bool:
        """Stop holding a request's blocks (abort); True if they were held.
        ``before_publish``: a streamed request may not be published yet - it
        is ended anyway, so its later publish is refused (``LeaseTable``).
        Pulls parked for it are refused now, not at their deadline."""
        held = self.leases.release(request_id, before_publish=before_publish)
        self._wake_parked()
        return held

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
            frames = P.FrameReader(conn)
            while not self._closing.is_set():
                if state.parked and not frames.buffered and not self._wait_parked(conn, state):
                    continue
                msg = frames.recv_message()
                if isinstance(msg, P.Release):
                    self._handle_release(msg, peer)
                elif state.refused:
                    raise P.ProtocolError(f"a refused consumer may only Release, got "
                                          f"{type(msg).__name__}")
                elif state.control:
                    if not isinstance(msg, P.Publish):
                        raise P.ProtocolError(f"a control connection may only Publish or "
                                              f"Release, got {type(msg).__name__}")
                    self._handle_publish(msg)
                elif isinstance(msg, P.Pull):
                    received = time.perf_counter()
                    if self._handle_pull(conn, msg, state):
                        self.serve_marks.append((msg.request_id, received,
                                                 time.perf_counter()))
                elif isinstance(msg, P.ReadDone):
                    request_id = state.granted.pop(msg.xfer_id, None)
                    if request_id is None:
                        raise P.ProtocolError(f"ReadDone for transfer {msg.xfer_id}, which "
                                              "was never granted")
                    partial = msg.xfer_id in state.partial
                    state.partial.discard(msg.xfer_id)
                    self.leases.end_read(request_id, msg.ok, counts=not partial)
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
            self._unpark_all(state)
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
        if not state.control and not self._serves(hs.backend):
            msg = f"consumer uses transport {hs.backend!r}, this producer serves {self.name!r}"
            self._refuse(peer, msg)
            self._try_send(conn, P.Error("backend", msg))
            return False
        state.medium = hs.backend
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
            state.backend = (None if state.control
                             else self._server_accept_peer(hs.info, hs.backend))
        except Exception as e:  # backend refused (e.g. not the same host)
            self._refuse(peer, str(e))
            self._try_send(conn, P.Error("backend", str(e)))
            return False
        P.send_message(conn, P.HandshakeAccept(self.layout, P.mac(self.secret, b"server",
                                                                   hello.nonce, nonce),
                                               {**self._server_info(),
                                                "instance": self.instance_id,
                                                # reads by block position, parked
                                                # until computed (streaming)
                                                "positions": True}))
        return True

    def _handle_release(self, msg: P.Release, peer: str) -> None:
        self.stats.releases_received += 1
        if self.release(msg.request_id, before_publish=True):
            logger.info("kvbridge: consumer %s released request %s unread (%s)", peer,
                        msg.request_id, msg.reason or "no reason given")

    def _handle_publish(self, msg: P.Publish) -> None:
        """The scheduler's publish, the only one a vLLM producer makes: if it
        fails, the request is reported released ("refused") so the engine
        frees its blocks, and a consumer that reads it hears it is gone."""
        try:
            self.publish(msg.request_id, msg.block_ids, num_tokens=msg.num_tokens)
            return
        except ValueError as e:  # bad block ids
            logger.error("kvbridge: control Publish of %s refused: %s", msg.request_id, e)
        except Exception as e:  # noqa: BLE001 - a failed before_publish hook (staging)
            logger.error("kvbridge: control Publish of %s failed: %s", msg.request_id, e)
        self.leases.refuse(msg.request_id)

    def _refuse(self, peer: str, reason: str) -> None:
        self.stats.handshakes_refused += 1
        self.refusals.append(reason)
        logger.error("kvbridge: refusing consumer %s: %s", peer, reason)

    # -- positional pulls of a streamed request, parked until computed --
    def _park(self, state: ServerConn, pull: P.Pull) -> None:
        if state.wake is None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            state.wake = r
            with self._parked_lock:
                self._parked_wakes[r] = w
        state.parked.append((pull, time.monotonic() + self.config.transfer_timeout_s))

    def _wait_parked(self, conn: socket.socket, state: ServerConn) -> bool:
        """Wait for the consumer's next message or for blocks a parked pull
        needs (``publish_progress`` wakes this), then grant each parked pull
        whose blocks are in; True when a message waits to be read. A pull parked past
        ``transfer_timeout_s`` is refused."""
        assert state.wake is not None
        readable, _, _ = select.select([conn, state.wake], [], [], 0.5)
        if state.wake in readable:
            os.read(state.wake, 4096)
        still = []
        for pull, deadline in state.parked:
            if self._handle_pull(conn, pull, state, park=False) is None:
                if time.monotonic() < deadline:
                    still.append((pull, deadline))
                    continue
                P.send_message(conn, P.PullError(
                    pull.xfer_id, f"request {pull.request_id!r}: blocks not computed within "
                    f"{self.config.transfer_timeout_s:.0f} s", "timeout"))
        state.parked = still
        if not still:
            self._unpark_all(state)
        return conn in readable

    def _unpark_all(self, state: ServerConn) -> None:
        state.parked = []
        if state.wake is not None:
            with self._parked_lock:
                w = self._parked_wakes.pop(state.wake, None)
                for fd in (state.wake, w):
                    if fd is not None:
                        os.close(fd)
            state.wake = None

    def _handle_pull(self, conn: socket.socket, pull: P.Pull, state: ServerConn, *,
                     park: bool = True) -> bool | None:
        """Grant (True) or refuse (False) one pull; None: parked, or (``park``
        False) its blocks are still not computed."""
        if pull.xfer_id in state.granted or (park and any(
                p.xfer_id == pull.xfer_id for p, _ in state.parked)):
            raise P.ProtocolError(f"transfer id {pull.xfer_id} is already in flight")
        try:
            sl = None
            if pull.slice is not None:
                try:
                    sl = BlockSlice(*pull.slice)
                    sl.check(self.layout.block_bytes)
                except (TypeError, ValueError) as e:
                    raise BlockIdError(f"bad block slice {pull.slice}: {e}") from None
                if sl.is_whole(self.layout.block_bytes):
                    sl = None
            if pull.positions:
                ids, digests = self.leases.begin_positional_read(
                    pull.request_id, [int(b) for b in pull.block_ids], max(1, pull.readers))
            else:
                ids = self.cache.validate(pull.block_ids)
                digests = self.leases.begin_read(pull.request_id, ids, max(1, pull.readers))
        except UnknownRequestError as e:
            if pull.positions and e.code == "not_published":
                if park:
                    self._park(state, pull)
                return None
            if e.code != "not_published":
                logger.warning("kvbridge: refusing pull %d: %s", pull.xfer_id, e.args[0])
            P.send_message(conn, P.PullError(pull.xfer_id, e.args[0], e.code))
            return False
        except BlockIdError as e:
            logger.warning("kvbridge: refusing pull %d: %s", pull.xfer_id, e)
            P.send_message(conn, P.PullError(pull.xfer_id, str(e), "blocks"))
            return False
        self.stats.pulls_served += 1
        state.granted[pull.xfer_id] = pull.request_id
        if not pull.final:
            state.partial.add(pull.xfer_id)
        if sl is not None and digests:
            # Published digests cover whole blocks: digest the slice sent.
            digests = checksum.block_digests(self.cache, ids, sl)
        grant = P.PullGrant(pull.xfer_id, self.cache.staging_bytes(len(ids), sl), digests,
                            ids if pull.positions else None)
        self._send_pull(conn, grant, ids, state, sl)
        return True

