# SPDX-License-Identifier: Apache-2.0
"""kvbridge's wire protocol: framed, versioned msgspec messages.

Every backend talks to its peer over one control connection (TCP) with this
protocol; the TCP backend also carries the KV bytes on it, in raw frames. The
NIXL and same-host backends move bytes on their own medium and use the control
connection for the handshake and for permission to read.

Frame: ``MAGIC (2 bytes) | kind (1 byte) | length (4 bytes, big endian) | body``
where kind is ``MSG`` (a msgpack-encoded message below) or ``DATA`` (raw KV
bytes whose size a preceding ``PullGrant`` announced). Message frames are at
most ``MAX_MESSAGE_BYTES``; a larger length, an unknown kind, a bad magic or a
body that is not a known message is a ``ProtocolError`` that closes only that
connection.

Connection lifecycle (client = consumer, server = producer)::

    client                                   server
    Hello(version, nonce)          ->
                                   <-        Challenge(version, nonce, auth_required)
    Handshake(layout, mac, info)   ->        (verify mac, then check_pairable)
                                   <-        HandshakeAccept(layout, mac, info)
                                             | Error(code, message) and close
    Pull(xfer_id, request_id, ids, slice, readers) ->
                                   <-        PullGrant(xfer_id, nbytes, checksums)
                                             [+ DATA frames]
                                             | PullError(xfer_id, message, code)
    ReadDone(xfer_id, request_id, ok) ->     (the producer may free the blocks)
    Release(request_id, reason)    ->        (never going to read it: free now)

A consumer whose layout the producer refused gets ``Error(code="layout")``,
and the connection stays open for ``Release`` only: the consumer fails each
pull for that producer at once and tells it which requests to drop, so a
refused request's blocks are freed now rather than at lease end. Anything but
``Release`` on a refused connection closes it.

``PullGrant.checksums`` holds one XXH3-64 digest per granted block (pull
order; see ``kvbridge.cache.checksum``), computed when the producer published the
request; the consumer verifies the bytes it landed before it reports the pull
done. Empty when the producer does not checksum.

A ``control`` client (the producer engine's scheduler, same host) handshakes
the same way with ``Handshake.backend = "control"`` and then only sends
``Publish(request_id, block_ids, num_tokens)`` - the one publish of a vLLM
producer, so blocks are readable as soon as the request finishes rather than
at the engine's next step - and ``Release`` when another rank could not be
reached. A publish the producer cannot carry out is released as "refused".

The server sends nothing about itself (not even its layout) before the
client's MAC verifies, so a peer without the shared secret learns nothing.

Changelog (``PROTOCOL_VERSION``, defined in ``kvbridge.wire_version``):
    1 - first version.
    2 - ``Release``; a layout-refused connection stays open for ``Release``;
        ``PullGrant.checksums``; ``HandshakeAccept.info["instance"]`` (the
        producer process's identity, so requests of a restarted producer fail
        at once).
    3 - TP-sharded pulls: ``Pull.slice`` (read only these bytes of each
        block: ``kvbridge.cache.shard.BlockSlice``), ``Pull.readers`` (consumer
        ranks that read this request here: the producer keeps the blocks
        until all of them have); the handshake pairs layouts of different TP
        sizes (``check_pairable``); MLA fields in the layout.
        Added within 3, as a feature the producer advertises
        (``HandshakeAccept.info["positions"]``) - an older producer would
        ignore the new fields and read the positions as block ids, so a
        consumer asks by position only where it is advertised: streamed
        requests (``kvbridge.vllm.stream``): ``Pull.positions`` (the ids are
        positions in the request's block list; the producer parks the pull
        until those blocks are computed), ``Pull.final`` (only the reader's
        last pull lets the blocks go), ``PullGrant.block_ids`` (the positions
        resolved, for backends whose consumer reads the producer's memory).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct

import msgspec

from kvbridge.errors import PeerClosed, PeerRefusedError, ProtocolError
from kvbridge.layout import KVLayout
from kvbridge.wire_version import PROTOCOL_VERSION

MAGIC = b"KB"
KIND_MSG = 1
KIND_DATA = 2
HEADER = struct.Struct("!2sBI")
#: Largest control message accepted. A Pull for 100k block ids fits easily.
MAX_MESSAGE_BYTES = 4 << 20
#: Environment variable holding the shared secret when the config has none.
SECRET_ENV = "KVBRIDGE_SECRET"


# -- messages -----------------------------------------------------------------

class Hello(msgspec.Struct, tag=True):
    """Consumer -> producer, first: the version it speaks and its nonce."""

    protocol_version: int
    #: 16 random bytes; the producer's MAC covers it (no replayed accepts)
    nonce: bytes
    #: the consumer's name, for the producer's logs
    agent: str = ""


class Challenge(msgspec.Struct, tag=True):
    """Producer -> consumer: its version, its nonce, and whether a MAC is required."""

    protocol_version: int
    nonce: bytes
    #: the producer has a shared secret: the Handshake must carry a valid MAC
    auth_required: bool


class Handshake(msgspec.Struct, tag=True):
    """Consumer -> producer: its layout, the MAC over both nonces, its backend and info."""

    layout: KVLayout
    mac: bytes = b""
    backend: str = ""
    info: dict = {}


class HandshakeAccept(msgspec.Struct, tag=True):
    """Producer -> consumer: paired; its layout, its MAC, its info (instance id...)."""

    layout: KVLayout
    mac: bytes = b""
    info: dict = {}


class Error(msgspec.Struct, tag=True):
    """Producer -> consumer: the handshake is refused; ``code`` is an
    ``errors.ErrorCode`` value (layout, auth, version, protocol)."""

    code: str
    message: str
    layout: KVLayout | None = None


class Pull(msgspec.Struct, tag=True):
    """Consumer -> producer: read these blocks of a published request."""

    xfer_id: int
    request_id: str
    block_ids: list[int]
    #: [offset, length, rows] of each block to send (``BlockSlice``); None: whole blocks
    slice: list[int] | None = None
    #: consumer ranks reading this request from this producer rank
    readers: int = 1
    #: ``block_ids`` are positions in the request's block list (a streamed
    #: request, whose block ids the consumer never learns); blocks not
    #: computed yet are granted once they are (only to a producer whose
    #: ``HandshakeAccept.info`` says ``positions``)
    positions: bool = False
    #: this reader's last pull of the request: only its ReadDone lets the
    #: blocks go (a streamed request is read in several pulls)
    final: bool = True


class PullGrant(msgspec.Struct, tag=True):
    """Producer -> consumer: the pull may go ahead (tcp: DATA frames follow)."""

    xfer_id: int
    nbytes: int
    #: one digest per granted block, in pull order; empty: not checksummed
    checksums: list[int] = []
    #: a positional pull's blocks, resolved: the producer's block ids, which
    #: a consumer that reads the producer's memory itself (cma, nixl) reads
    block_ids: list[int] | None = None


class PullError(msgspec.Struct, tag=True):
    """Producer -> consumer: this pull cannot be served."""

    xfer_id: int
    message: str
    #: "not_published" (may still come: the consumer retries for a while),
    #: "ended" (read, released or expired: never retry), "blocks" (bad ids)
    code: str = ""


class Release(msgspec.Struct, tag=True):
    """Consumer -> producer: this request will not be read (aborted, served
    from a local prefix cache, failed here, or refused): free its blocks now."""

    request_id: str
    reason: str = ""


class ReadDone(msgspec.Struct, tag=True):
    """Consumer -> producer: a direct read (cma, nixl) finished; ``ok`` False if it failed."""

    xfer_id: int
    request_id: str
    #: False: the read failed on the consumer's side; the producer keeps the
    #: blocks for a retry (or until the lease ends)
    ok: bool = True


class Publish(msgspec.Struct, tag=True):
    """From the producer engine's own scheduler (a ``control`` connection):
    hold these blocks now, without waiting for the engine's next step."""

    request_id: str
    block_ids: list[int]
    num_tokens: int | None = None


Message = Hello | Challenge | Handshake | HandshakeAccept | Error | Pull | PullGrant | PullError \
    | ReadDone | Release | Publish

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    body = _encoder.encode(msg)
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return HEADER.pack(MAGIC, KIND_MSG, len(body)) + body


def data_header(nbytes: int) -> bytes:
    return HEADER.pack(MAGIC, KIND_DATA, nbytes)


def decode(body: bytes) -> Message:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:  # ValidationError is a subclass
        raise ProtocolError(f"undecodable message: {e}") from None
    except (RecursionError, ValueError, OverflowError) as e:
        # msgspec recurses into nested containers (an unknown field it skips
        # too): about 1000 levels, ~1 KB of input, raise RecursionError.
        raise ProtocolError(f"undecodable message: {type(e).__name__}") from None


# -- framed socket I/O ----------------------------------------------------------

def tune_socket(sock: socket.socket, buffer_bytes: int, dead_peer_s: float | None = None) -> None:
    """No Nagle delay on small messages; kernel buffers sized for bulk KV.

    ``dead_peer_s``: TCP keepalive probes after that many idle seconds, so a
    peer behind a pulled cable or a dead host is noticed within about twice
    that (the idle time, then three probes): an idle connection that waits
    for a direct read (cma, nixl) to finish would otherwise never learn it
    will not, and the blocks it holds for that read would never be freed.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
        except OSError:  # capped by net.core.*mem_max: the kernel's size stands
            pass
    if dead_peer_s and hasattr(socket, "TCP_KEEPIDLE"):  # Linux
        idle = max(1, int(dead_peer_s))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; PeerClosed (with ``received``) on EOF first."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed(f"peer closed the connection after {got} of {n} bytes",
                             received=got)
        got += k


def recv_header(sock: socket.socket) -> tuple[int, int]:
    """Read one frame header; returns (kind, length). Raises on bad framing."""
    hdr = bytearray(HEADER.size)
    try:
        recv_exact_into(sock, memoryview(hdr))
    except PeerClosed as e:
        if e.received == 0:
            raise PeerClosed("peer closed the connection") from None
        raise PeerClosed("truncated frame header") from None
    return _checked_header(*HEADER.unpack(hdr))


def _checked_header(magic: bytes, kind: int, length: int) -> tuple[int, int]:
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r} (not a kvbridge peer?)")
    if kind not in (KIND_MSG, KIND_DATA):
        raise ProtocolError(f"unknown frame kind {kind}")
    if kind == KIND_MSG and length > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"oversized message frame: {length} bytes > {MAX_MESSAGE_BYTES}")
    return kind, length


#: Largest message before the peer authenticated (Hello, Handshake): a
#: stranger cannot make the producer allocate MAX_MESSAGE_BYTES per connection.
MAX_HANDSHAKE_BYTES = 256 << 10


def recv_message(sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    kind, length = recv_header(sock)
    if kind != KIND_MSG:
        raise ProtocolError("expected a message frame, got a data frame")
    if length > max_bytes:
        raise ProtocolError(f"oversized message frame: {length} bytes > {max_bytes}")
    body = bytearray(length)
    try:
        recv_exact_into(sock, memoryview(body))
    except PeerClosed:
        raise PeerClosed(f"truncated message frame (expected {length} bytes)") from None
    return decode(bytes(body))


def send_message(sock: socket.socket, msg: Message) -> None:
    sock.sendall(encode(msg))


#: Bytes a ``FrameReader`` reads ahead [64 KiB]: a control message and the
#: first data bytes after it in one ``recv``.
READ_AHEAD_BYTES = 64 << 10


class FrameReader:
    """Frames from one connection, read ahead into one buffer: a small message,
    or a grant with the header and first bytes of its data, arrives in one
    ``recv`` instead of three. One thread reads through it.

    A socket timeout (the consumer's stall checks) never loses a byte: a
    message is taken from the buffer only once it is whole, so the next call
    starts where this one stopped."""

    def __init__(self, sock: socket.socket, read_ahead: int = READ_AHEAD_BYTES):
        self.sock = sock
        self._size = read_ahead
        self._buf = bytearray(read_ahead)
        self._start = self._end = 0

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def _fill(self, n: int) -> None:
        """Hold at least ``n`` unread bytes (growing the buffer if needed)."""
        if self._end - self._start >= n:
            return
        if len(self._buf) - self._start < n:
            pending = self._buf[self._start:self._end]
            if len(self._buf) < n:
                self._buf = bytearray(max(n, self._size))
            self._buf[:len(pending)] = pending
            self._start, self._end = 0, len(pending)
        view = memoryview(self._buf)
        while self._end - self._start < n:
            got = self.sock.recv_into(view[self._end:])
            if got == 0:
                raise PeerClosed(f"peer closed the connection after {self.buffered} of {n} "
                                 "bytes", received=self.buffered)
            self._end += got

    def _header(self) -> tuple[int, int]:
        try:
            self._fill(HEADER.size)
        except PeerClosed as e:
            if e.received == 0:
                raise PeerClosed("peer closed the connection") from None
            raise PeerClosed("truncated frame header") from None
        return _checked_header(*HEADER.unpack_from(self._buf, self._start))

    def recv_message(self, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
        kind, length = self._header()
        if kind != KIND_MSG:
            raise ProtocolError("expected a message frame, got a data frame")
        if length > max_bytes:
            raise ProtocolError(f"oversized message frame: {length} bytes > {max_bytes}")
        try:
            self._fill(HEADER.size + length)
        except PeerClosed:
            raise PeerClosed(f"truncated message frame (expected {length} bytes)") from None
        body = bytes(self._buf[self._start + HEADER.size:self._start + HEADER.size + length])
        self._consume(HEADER.size + length)
        return decode(body)

    def recv_header(self) -> tuple[int, int]:
        """The next frame's header, taken (the frame's bytes follow: ``take_into``)."""
        kind, length = self._header()
        self._consume(HEADER.size)
        return kind, length

    def take_into(self, view: memoryview) -> int:
        """Copy up to ``len(view)`` read-ahead bytes into ``view``; how many."""
        n = min(len(view), self._end - self._start)
        if n:
            view[:n] = self._buf[self._start:self._start + n]
            self._consume(n)
        return n

    def _consume(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > self._size:  # a large message grew it: shrink back
                self._buf = bytearray(self._size)


def client_handshake(sock: socket.socket, layout: KVLayout, backend: str,
                     secret: bytes | None, info: dict, agent: str = "") -> HandshakeAccept:
    """The client half of the handshake; returns the producer's accept.

    Raises ``PeerRefused`` (with the producer's ``Error``) or ``ProtocolError``;
    layout checks are the caller's (both sides run ``check_pairable``).
    """
    nonce = new_nonce()
    send_message(sock, Hello(PROTOCOL_VERSION, nonce, agent))
    ch = recv_message(sock)
    if isinstance(ch, Error):
        raise PeerRefused(ch)
    if not isinstance(ch, Challenge):
        raise ProtocolError(f"expected Challenge, got {type(ch).__name__}")
    if ch.auth_required and secret is None:
        raise PeerRefused(Error("auth", "producer requires a shared secret and none is "
                                f"configured (set {SECRET_ENV} or the transport's secret)"))
    send_message(sock, Handshake(layout, mac(secret, b"client", ch.nonce, nonce), backend, info))
    reply = recv_message(sock)
    if isinstance(reply, Error):
        raise PeerRefused(reply)
    if not isinstance(reply, HandshakeAccept):
        raise ProtocolError(f"expected HandshakeAccept, got {type(reply).__name__}")
    if ch.auth_required and not verify_mac(secret, reply.mac, b"server", nonce, ch.nonce):
        raise PeerRefused(Error("auth", "producer failed to prove it knows the shared secret"))
    return reply


#: Kept under its old name: the handshake refusal is ``errors.PeerRefusedError``.
PeerRefused = PeerRefusedError


# -- authentication -------------------------------------------------------------

def new_nonce() -> bytes:
    return os.urandom(16)


def resolve_secret(secret: str | bytes | None) -> bytes | None:
    """The configured secret, else ``$KVBRIDGE_SECRET``, else None (no auth)."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or None
    if secret is None:
        return None
    return secret.encode() if isinstance(secret, str) else secret


def mac(secret: bytes | None, role: bytes, *nonces: bytes) -> bytes:
    """HMAC-SHA256 over a role tag and both nonces (empty without a secret)."""
    if secret is None:
        return b""
    return hmac.new(secret, role + b"".join(nonces), hashlib.sha256).digest()


def verify_mac(secret: bytes | None, got: bytes, role: bytes, *nonces: bytes) -> bool:
    if secret is None:
        return True
    return hmac.compare_digest(got, mac(secret, role, *nonces))


__all__ = [
    "PROTOCOL_VERSION", "Challenge", "Error", "Handshake", "HandshakeAccept", "Hello", "Message",
    "PeerClosed", "ProtocolError", "Publish", "Pull", "PullError", "PullGrant", "ReadDone",
    "Release",
]
