# SPDX-License-Identifier: Apache-2.0
"""The consumer's link to one producer: ``PeerConnection`` and the handshake
that opens it (connect, authenticate, compare layouts, prepare backend data).

``PeerLinks`` is a mixin of ``Transport`` (through ``ConsumerSide``)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque

from kvbridge import protocol as P
from kvbridge.errors import ErrorCode, TransferError, code_of
from kvbridge.layout import (
    KVLayout,
    LayoutMismatchError,
    check_pairable,
    layout_differences,
)
from kvbridge.transport.handle import TransferHandle

logger = logging.getLogger("kvbridge.transport")


def _pairing_error(local: KVLayout, remote: KVLayout) -> LayoutMismatchError:
    """Why ``remote`` refused ``local``: ``check_pairable``'s error (with the
    reason a TP split is impossible), or every differing field."""
    try:
        check_pairable(local, remote)
    except LayoutMismatchError as e:
        return e
    return LayoutMismatchError(layout_differences(local, remote))



class PeerConnection:
    """Consumer side of one producer: a handshaken control connection plus
    backend state prepared once (``data``)."""

    def __init__(self, address: str):
        self.address = address
        self.sock: socket.socket | None = None
        #: reads ``sock`` after the handshake (the reader thread only)
        self.frames: P.FrameReader | None = None
        self.remote_layout: KVLayout | None = None
        self.remote_info: dict = {}
        self.data: object = None
        self.inflight: deque[TransferHandle] = deque()
        self.send_lock = threading.Lock()
        self.ready = threading.Event()
        self.error: str | None = None
        self.error_code: ErrorCode | None = None
        self.closed = False
        self.reader: threading.Thread | None = None
        #: the producer refused our layout: every pull fails at once with this
        #: (the connection stays open so we can tell it what to drop)
        self.refusal: LayoutMismatchError | None = None
        #: the producer process's identity (``Transport.instance_id`` there)
        self.instance: str | None = None
        #: the medium the bytes move by ("tcp", "cma"...): the backend's name,
        #: or what ``auto`` chose for this producer
        self.medium: str | None = None

class PeerLinks:
    """One handshaken ``PeerConnection`` per producer address (a mixin)."""

    def handshake(self, peer: str) -> KVLayout:
        """Connect and handshake with ``peer`` now (else the first pull does);
        returns the remote layout or raises (``LayoutMismatchError``, ...)."""
        conn = self._peer(peer)
        self._ensure_connected(conn)
        if conn.refusal is not None:
            raise conn.refusal
        if conn.error or conn.remote_layout is None:
            raise TransferError(conn.error or f"no connection to {peer}",
                                conn.error_code or ErrorCode.PEER_GONE)
        return conn.remote_layout

    def _peer(self, address: str) -> PeerConnection:
        with self._peers_lock:
            conn = self._peers.get(address)
            if conn is None or conn.closed:
                conn = PeerConnection(address)
                self._peers[address] = conn
            return conn

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
                conn.error_code = code_of(e)
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
                raise TransferError(conn.error, conn.error_code) from e
            if conn.refusal is not None:
                self.stats.handshakes_refused += 1
                logger.error("kvbridge: handshake with %s refused: %s", conn.address,
                             conn.refusal)
            else:
                self.stats.handshakes += 1
                self.stats.handshake_seconds += time.monotonic() - t0
                # Which producers this consumer reads from, once per connection.
                medium = conn.medium or self.name
                self.stats.media[medium] = self.stats.media.get(medium, 0) + 1
                logger.info("kvbridge: paired with producer %s (%s, handshake %.1f ms)",
                            conn.address, medium if medium == self.name
                            else f"{self.name}: {medium}", 1e3 * (time.monotonic() - t0))
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
                    raise TransferError(f"connection reset during the handshake: {e}",
                                        ErrorCode.PEER_GONE) from e
                logger.info("kvbridge: handshake with %s: %s; retrying in %.2f s",
                            conn.address, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _client_handshake_once(self, conn: PeerConnection, deadline: float) -> None:
        host, _, port = conn.address.rpartition(":")
        sock = socket.create_connection((host, int(port)),
                                        timeout=max(0.1, deadline - time.monotonic()))
        conn.sock = sock
        # Read through after the handshake (which reads ``sock`` directly:
        # the producer sends nothing unasked, so nothing is read ahead then).
        conn.frames = P.FrameReader(sock)
        self._tune(sock)
        try:
            conn.medium = self._medium_for(conn)
            reply = P.client_handshake(sock, self.layout, conn.medium, self.secret,
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
                                    else f"producer refused: {err.message}", e.code) from None
            raise TransferError(f"producer refused: {err.message}", e.code) from None
        check_pairable(self.layout, reply.layout)
        conn.remote_layout = reply.layout
        conn.remote_info = reply.info
        conn.instance = reply.info.get("instance")
        conn.data = self._connect_data(conn)
        sock.settimeout(min(1.0, self.config.transfer_timeout_s))

