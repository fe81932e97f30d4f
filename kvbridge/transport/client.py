# SPDX-License-Identifier: Apache-2.0
"""The consumer side of every transport: ``pull``, the handshake with each
producer, submitting pulls, the per-producer reader thread (grants, refusals,
retries, stall checks) and finishing each pull (verify, ReadDone, release);
the handshake that opens each producer's connection is in ``peer.py``.

``ConsumerSide`` is a mixin of ``Transport``; it uses the state ``Transport``
sets up and calls its backend hooks (``_connect_data``, ``_receive_pull``...)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence

from kvbridge import protocol as P
from kvbridge.cache import checksum
from kvbridge.cache.blocks import BlockIdError
from kvbridge.cache.shard import BlockSlice

# from_wire_code: a wire code this side does not know is a protocol error.
from kvbridge.errors import (
    ErrorCode,
    KVBridgeError,
    TransferError,
    code_of,
    from_wire_code,
)
from kvbridge.transport.handle import TransferHandle, TransferState
from kvbridge.transport.peer import PeerConnection, PeerLinks

logger = logging.getLogger("kvbridge.transport")


class ConsumerSide(PeerLinks):
    """Pull from producers (a ``Transport`` mixin)."""

    def pull(self, peer: str, request_id: str, remote_block_ids: Sequence[int],
             local_block_ids: Sequence[int], *,
             producer_instance: str | None = None,
             remote_slice: BlockSlice | None = None, local_slice: BlockSlice | None = None,
             readers: int = 1, positions: bool = False, final: bool = True,
             ) -> TransferHandle:
        """Start reading ``remote_block_ids`` of ``request_id`` on ``peer`` into
        ``local_block_ids`` here. Never blocks on the network.

        ``producer_instance``: the producer process the request was published
        by (its ``instance_id``, carried in the ticket); if another process
        now serves that address (a restart), the pull fails at once.

        Tensor parallelism (``kvbridge.cache.shard.plan_reads`` gives all three):
        ``remote_slice`` reads only those bytes of each remote block,
        ``local_slice`` writes only those bytes of each local block, and
        ``readers`` tells the producer how many consumer ranks read this
        request from it (it holds the blocks until all have).

        Streaming (``Transport.publish_progress`` on the producer):
        ``positions`` - ``remote_block_ids`` are positions in the request's
        block list; the producer grants the pull once those blocks are
        computed, so a consumer may ask before prefill ends. ``final`` - this
        is this reader's last pull of the request (False for the earlier
        chunks): only its completion lets the producer free the blocks."""
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
        handle.positions, handle.final = bool(positions), bool(final)
        handle._cancel_cb = self._on_cancel
        handle._on_finish = self.progress.set
        conn = self._peer(peer)
        if conn.ready.is_set() and not conn.closed:
            # Connected already: sending the small Pull inline costs less than a
            # thread hop (the reply arrives on the peer's reader thread).
            self._submit(handle)
        else:
            threading.Thread(target=self._submit, args=(handle,), daemon=True,
                             name=f"{self.name}-pull-{xfer_id}").start()
        return handle

    def _submit(self, handle: TransferHandle) -> None:
        conn = self._peer(handle.peer)
        if not conn.ready.is_set():
            handle._advance(TransferState.HANDSHAKING)
        try:
            self._ensure_connected(conn)
        except Exception as e:  # noqa: BLE001 - reported through the handle
            self._fail(handle, f"{e}", code_of(e))
            return
        if conn.error:
            self._fail(handle, conn.error, conn.error_code or ErrorCode.PEER_GONE)
            return
        if conn.refusal is not None:
            # Refused at the handshake: fail now, and let the producer drop it.
            self._send_release(conn, handle.request_id, "layout refused")
            self._fail(handle, f"handshake with {conn.address} refused: {conn.refusal}",
                       ErrorCode.LAYOUT)
            return
        if (handle.producer_instance and conn.instance
                and handle.producer_instance != conn.instance):
            self._fail(handle, f"producer at {conn.address} restarted: request "
                               f"{handle.request_id!r} belonged to its previous process, "
                               "whose blocks are gone", ErrorCode.PEER_GONE)
            return
        if handle.state.finished:  # cancelled while connecting
            return
        if handle.positions and not conn.remote_info.get("positions"):
            self._fail(handle, f"the producer at {conn.address} cannot serve reads by block "
                               "position (streaming): it runs an older kvbridge",
                       ErrorCode.PROTOCOL)
            return
        remote_bytes = (handle.remote_slice.nbytes() if handle.remote_slice is not None
                        else conn.remote_layout.block_bytes if conn.remote_layout else None)
        local_bytes = handle.nbytes // max(1, len(handle.local_ids) * self.layout.num_regions)
        if handle.local_ids and remote_bytes is not None and remote_bytes != local_bytes:
            self._fail(handle, f"the producer at {conn.address} has {remote_bytes} bytes per "
                               f"block and region to read, {local_bytes} are written here "
                               "(a TP slice that does not fit)", ErrorCode.LAYOUT)
            return
        with conn.send_lock:
            if conn.closed:
                self._fail(handle, conn.error or "connection closed",
                           conn.error_code or ErrorCode.PEER_GONE)
                return
            handle._advance(TransferState.TRANSFERRING)
            conn.inflight.append(handle)
            try:
                frame = P.encode(self._pull_message(handle))
                handle._mark("asked")
                conn.sock.sendall(frame)
            except OSError as e:
                self._close_peer(conn, f"send to producer {conn.address} failed: {e}",
                                 ErrorCode.PEER_GONE)

    @staticmethod
    def _pull_message(handle: TransferHandle) -> P.Pull:
        sl = handle.remote_slice
        return P.Pull(handle.xfer_id, handle.request_id, handle.remote_ids,
                      None if sl is None else [sl.offset, sl.length, sl.rows], handle.readers,
                      handle.positions, handle.final)

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
            self._fail(handle, conn.error or "connection closed",
                       conn.error_code or ErrorCode.PEER_GONE)

    def _reader_loop(self, conn: PeerConnection) -> None:
        frames = conn.frames
        assert frames is not None
        reason, code = "connection closed", ErrorCode.PEER_GONE
        #: the pull whose bytes are being received: out of ``conn.inflight``,
        #: so a failure mid-transfer must fail it here
        receiving: TransferHandle | None = None
        try:
            while not conn.closed:
                try:
                    msg = frames.recv_message()
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
                        self._fail(handle, f"producer refused the pull: {msg.message}",
                                   from_wire_code(msg.code))
                        continue
                    receiving = handle
                    handle._mark("granted")
                    if handle.positions:
                        if (msg.block_ids is None
                                or len(msg.block_ids) != len(handle.remote_ids)):
                            raise P.ProtocolError(f"grant of positional pull {msg.xfer_id} "
                                                  "does not name its blocks")
                        # From here the producer's own block ids (cma, nixl read them).
                        handle.remote_ids = [int(b) for b in msg.block_ids]
                    ok = self._receive_pull(conn, handle, msg)
                    handle._mark("landed")
                    self._finish_read(conn, handle, ok, msg)
                    receiving = None
                elif isinstance(msg, P.Error):
                    raise TransferError(f"producer error ({msg.code}): {msg.message}",
                                        from_wire_code(msg.code))
                else:
                    raise P.ProtocolError(f"unexpected {type(msg).__name__} from producer")
        except P.PeerClosed as e:
            reason = f"producer {conn.address} closed the connection ({e})"
            code = ErrorCode.PEER_GONE
        except (P.ProtocolError, TransferError, OSError) as e:
            reason = f"connection to producer {conn.address} failed: {e}"
            # A socket error on the control connection: the producer is gone
            # (or hung: a timeout), unless the error carries its own code.
            code = (e.code if isinstance(e, KVBridgeError) else
                    ErrorCode.TIMEOUT if isinstance(e, TimeoutError) else ErrorCode.PEER_GONE)
        except Exception as e:  # noqa: BLE001 - fail the pulls, never hang them
            logger.exception("kvbridge: reader for %s failed", conn.address)
            reason = f"connection to producer {conn.address} failed: {type(e).__name__}: {e}"
            code = ErrorCode.TRANSFER
        finally:
            self._close_peer(conn, reason, code)
            if receiving is not None:
                self._fail(receiving, reason, code)

    def _check_stalled(self, conn: PeerConnection) -> None:
        now = time.monotonic()
        for handle in list(conn.inflight):
            # A positional pull waits at the producer for blocks still being
            # computed, which refuses it after transfer_timeout_s itself.
            limit = self.config.transfer_timeout_s * (2 if handle.positions else 1)
            if now - (handle.started or handle.created) > limit:
                raise TransferError(f"no progress for {self.config.transfer_timeout_s:.0f} s "
                                    "(producer hung?)", ErrorCode.TIMEOUT)

    def _pop_inflight(self, conn: PeerConnection, xfer_id: int) -> TransferHandle:
        with conn.send_lock:
            if conn.inflight and conn.inflight[0].xfer_id == xfer_id:
                return conn.inflight.popleft()
            # Out of order: a positional pull parked at the producer is
            # answered after pulls sent later.
            if any(h.positions for h in conn.inflight):
                for handle in conn.inflight:
                    if handle.xfer_id == xfer_id:
                        conn.inflight.remove(handle)
                        return handle
            raise P.ProtocolError(f"reply for unknown transfer {xfer_id}")

    def _finish_read(self, conn: PeerConnection, handle: TransferHandle, ok: bool,
                     grant: P.PullGrant) -> None:
        cancelled = handle.cancel_requested and not ok
        if ok:
            ok = self._verify(handle, grant)
            handle._mark("verified")
        with conn.send_lock:
            try:
                P.send_message(conn.sock, P.ReadDone(handle.xfer_id, handle.request_id, ok))
            except OSError:
                pass
        handle._mark("read_done")
        if not ok and not cancelled:
            # A failed pull is final: hand the request back so the producer
            # frees it now. (A cancel is not: the caller may pull again, or
            # release it with ``release_remote``.)
            self._send_release(conn, handle.request_id, handle.error or "failed")
        if ok and self.after_pull is not None:
            try:
                self.after_pull(list(handle.local_ids))
            except Exception as e:  # noqa: BLE001 - fail this pull, not the reader thread
                self._fail(handle, f"after_pull hook failed: {e}", ErrorCode.TRANSFER)
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
            self._fail(handle, handle.error or "transfer failed",
                       handle.error_code or ErrorCode.TRANSFER)

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
            handle._set_error(f"producer sent {len(grant.checksums)} checksums for "
                              f"{len(handle.local_ids)} blocks", ErrorCode.CHECKSUM)
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
        handle._set_error(f"checksum mismatch: {len(bad)} of {len(handle.local_ids)} blocks "
                          f"landed corrupted (local blocks {bad[:8]})", ErrorCode.CHECKSUM)
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

    def _fail(self, handle: TransferHandle, reason: str, code: ErrorCode) -> None:
        if handle._advance(TransferState.FAILED, reason, code):
            self.stats.transfers_failed += 1
            # Keyed by the code's value: plain strings in metrics and JSON.
            kind = ErrorCode(code).value
            self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
            logger.warning("kvbridge: pull %d of request %s from %s failed: %s", handle.xfer_id,
                           handle.request_id, handle.peer, reason)

    def _close_peer(self, conn: PeerConnection, reason: str, code: ErrorCode) -> None:
        with conn.send_lock:
            if conn.closed and not conn.inflight:
                return
            conn.closed = True
            if conn.error is None:
                conn.error, conn.error_code = reason, code
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
            self._fail(h, reason, code)

    def _on_cancel(self, handle: TransferHandle) -> None:
        """A transfer mid-flight finishes into scratch space (see backends).
        A positional pull may be parked at the producer until prefill
        computes its blocks: hand the request back, so it is refused now."""
        if handle.positions:
            self.release_remote(handle.peer, handle.request_id, "cancelled")
