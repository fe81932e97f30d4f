# SPDX-License-Identifier: Apache-2.0
"""Malformed input never crashes a producer: every backend's control listener
answers bad frames with a clear error, closes only that connection and keeps
serving the others."""

from __future__ import annotations

import os
import socket
import threading

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbridge import protocol as P
from kvbridge.layout import KVLayout
from kvbridge.transport import TransferState, TransportConfig, available, create_transport
from conftest import TRANSPORT_BACKENDS as BACKENDS
from helpers.procs import ENV, Producer
from helpers.transport_peer import make_cache

LAYOUT = make_cache(4, None).layout


@pytest.fixture(scope="module", params=BACKENDS)
def served(request):
    if request.param not in available():
        pytest.fail(f"backend {request.param} unavailable")
    os.environ.update(ENV)
    prod = Producer(request.param)
    yield request.param, prod
    prod.stop()


def _host_port(address):
    host, _, port = address.rpartition(":")
    return host, int(port)


def talk(address: str, payload: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send raw bytes, half-close; return what the server said and whether it
    closed the connection (False: it still held it open at ``timeout``)."""
    closed = False
    with socket.create_connection(_host_port(address), timeout=timeout) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    closed = True
                    break
                chunks.append(b)
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
    return b"".join(chunks), closed


def exchange(address: str, payload: bytes, timeout: float = 3.0) -> bytes:
    """Send raw bytes, half-close, return whatever the server says before closing."""
    return talk(address, payload, timeout)[0]


def frames(data: bytes) -> list:
    out = []
    while len(data) >= P.HEADER.size:
        magic, kind, length = P.HEADER.unpack_from(data)
        body = data[P.HEADER.size:P.HEADER.size + length]
        data = data[P.HEADER.size + length:]
        if kind == P.KIND_MSG:
            out.append(P.decode(body))
    return out


def assert_still_serves(backend: str, prod: Producer, rid: str) -> None:
    prod.publish(rid, [1, 2])
    cache = make_cache(64, None)
    with create_transport(backend, cache, TransportConfig()) as t:
        h = t.pull(prod.address, rid, [1, 2], [3, 4])
        assert h.wait(30) == TransferState.DONE, h.error
    assert prod.proc.is_alive()


def hello(version=P.PROTOCOL_VERSION) -> bytes:
    return P.encode(P.Hello(version, b"n" * 16, "fuzz"))


def test_wrong_protocol_version_gets_a_clear_error(served):
    backend, prod = served
    reply = frames(exchange(prod.address, hello(P.PROTOCOL_VERSION + 7)))
    assert len(reply) == 1 and isinstance(reply[0], P.Error)
    assert reply[0].code == "version"
    assert f"unsupported protocol version {P.PROTOCOL_VERSION + 7}" in reply[0].message
    assert_still_serves(backend, prod, "after-version")


@pytest.mark.parametrize("payload,expect", [
    (b"GET / HTTP/1.1\r\n\r\n", "bad frame magic"),
    (P.HEADER.pack(P.MAGIC, P.KIND_MSG, P.MAX_MESSAGE_BYTES + 1), "oversized message frame"),
    (P.HEADER.pack(P.MAGIC, 9, 4) + b"abcd", "unknown frame kind 9"),
    (P.HEADER.pack(P.MAGIC, P.KIND_MSG, 5) + b"\xc1\xc1\xc1\xc1\xc1", "undecodable message"),
    (P.encode(P.Pull(1, "r", [1])), "expected Hello, got Pull"),
    (P.HEADER.pack(P.MAGIC, P.KIND_DATA, 10) + b"x" * 10, "expected a message frame"),
])
def test_malformed_frames_get_named_errors(served, payload, expect):
    backend, prod = served
    reply = frames(exchange(prod.address, payload))
    assert reply and isinstance(reply[-1], P.Error), reply
    assert expect in reply[-1].message


def test_truncated_frames_close_quietly(served):
    backend, prod = served
    full = hello()
    for cut in (1, P.HEADER.size - 1, P.HEADER.size + 3, len(full) - 1):
        # Nothing said (not even a Challenge: no whole Hello came), and closed.
        assert talk(prod.address, full[:cut]) == (b"", True), cut
    assert_still_serves(backend, prod, "after-truncation")


def test_pull_before_handshake_completes_is_refused(served):
    backend, prod = served
    prod.publish("secret-blocks", [1])
    payload = hello() + P.encode(P.Pull(1, "secret-blocks", [1]))
    reply = frames(exchange(prod.address, payload))
    assert isinstance(reply[0], P.Challenge)
    assert isinstance(reply[-1], P.Error) and "expected Handshake, got Pull" in reply[-1].message
    assert not any(isinstance(m, (P.PullGrant, P.HandshakeAccept)) for m in reply)


def _valid_frames():
    hs = P.encode(P.Handshake(LAYOUT, b"", "tcp", {}))
    return [hello(), hs, P.encode(P.ReadDone(1, "r")), P.encode(P.Pull(3, "x", [0, 1]))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_frames_never_crash_the_server(served, data):
    backend, prod = served
    kind = data.draw(st.sampled_from(["garbage", "mutated", "header", "prefix"]))
    if kind == "garbage":
        payload = data.draw(st.binary(max_size=512))
    elif kind == "mutated":
        base = bytearray(b"".join(data.draw(st.lists(st.sampled_from(_valid_frames()),
                                                      min_size=1, max_size=3))))
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, len(base) - 1))
            base[i] = data.draw(st.integers(0, 255))
        payload = bytes(base)
    elif kind == "header":
        payload = P.HEADER.pack(data.draw(st.sampled_from([P.MAGIC, b"XX"])),
                                data.draw(st.integers(0, 255)),
                                data.draw(st.integers(0, 2**32 - 1))) + data.draw(
            st.binary(max_size=64))
    else:
        frame = data.draw(st.sampled_from(_valid_frames()))
        payload = frame[:data.draw(st.integers(0, len(frame)))]
    data, closed = talk(prod.address, payload, timeout=5.0)
    assert closed, f"the producer kept a half-closed connection open (sent {data[:64]!r})"
    check_refusal(data, payload)
    assert prod.proc.is_alive()


#: what a producer may answer a client that never authenticates nor reads
#: (no secret is set here, so a well-formed Hello and Handshake are accepted)
ALLOWED_REPLIES = (P.Challenge, P.HandshakeAccept, P.PullError, P.Error)
REFUSAL_CODES = {"protocol", "version", "auth", "layout", "backend"}


def check_refusal(data: bytes, payload: bytes) -> None:
    """The producer's whole answer to ``payload``: whole, decodable message
    frames only (no bytes granted), the Challenge first if at all, at most one
    ``Error`` - last, with a refusal code (never ``internal``, an unexpected
    exception) and a message - and no ``PullGrant``."""
    why = f"payload {payload[:64].hex()}, reply {data[:96].hex()}"
    msgs, rest = [], data
    while rest:
        assert len(rest) >= P.HEADER.size, f"torn frame header; {why}"
        magic, kind, length = P.HEADER.unpack_from(rest)
        assert magic == P.MAGIC and kind == P.KIND_MSG, f"not a message frame; {why}"
        assert len(rest) >= P.HEADER.size + length, f"torn frame body; {why}"
        msgs.append(P.decode(rest[P.HEADER.size:P.HEADER.size + length]))
        rest = rest[P.HEADER.size + length:]
    assert all(isinstance(m, ALLOWED_REPLIES) for m in msgs), (msgs, why)
    assert not any(isinstance(m, P.Challenge) for m in msgs[1:]), (msgs, why)
    errors = [i for i, m in enumerate(msgs) if isinstance(m, P.Error)]
    assert errors in ([], [len(msgs) - 1]), (msgs, why)
    if errors:
        err = msgs[-1]
        assert err.code in REFUSAL_CODES and err.message, (err, why)
    if payload[:2] != P.MAGIC:
        # Not even a frame: refused before anything else is said.
        assert msgs == [] or (len(msgs) == 1 and isinstance(msgs[0], P.Error)
                              and msgs[0].code == "protocol"), (msgs, why)


def test_server_serves_after_fuzzing(served):
    """Independent of the tests before it: fuzz here, then a real pull works
    and the producer counted the bad input."""
    backend, prod = served
    base = prod.call("metrics")["protocol_errors"]
    for payload in (b"\x00" * 9, P.HEADER.pack(P.MAGIC, 9, 4) + b"abcd",
                    P.HEADER.pack(P.MAGIC, P.KIND_MSG, 3) + b"\xc1\xc1\xc1"):
        data, closed = talk(prod.address, payload)
        assert closed
        check_refusal(data, payload)
    assert_still_serves(backend, prod, "after-fuzz")
    assert prod.call("metrics")["protocol_errors"] >= base + 3


def test_messages_round_trip_and_reject_unknown_types():
    msg = P.Pull(7, "req", [1, 2, 3])
    assert P.decode(P.encode(msg)[P.HEADER.size:]) == msg
    bogus = msgspec.msgpack.encode({"type": "Teleport", "xfer_id": 1})
    with pytest.raises(P.ProtocolError, match="undecodable"):
        P.decode(bogus)
    with pytest.raises(P.ProtocolError):
        P.decode(msgspec.msgpack.encode({"type": "Pull", "xfer_id": "1", "request_id": "r",
                                         "block_ids": [1]}))
    assert isinstance(P.decode(P.encode(P.Handshake(LAYOUT))[P.HEADER.size:]).layout, KVLayout)


# -- FrameReader: read-ahead never loses, reorders or invents a byte ---------------------

def _frames(*msgs: P.Message, data: bytes = b"") -> bytes:
    out = b"".join(P.encode(m) for m in msgs)
    return out + (P.data_header(len(data)) + data if data else b"")


def test_frame_reader_reads_messages_and_data_in_any_split():
    grant = P.PullGrant(3, 10_000, [1, 2])
    data = os.urandom(10_000)
    stream = _frames(P.Pull(1, "a", [1]), P.ReadDone(2, "a", True), grant, data=data)
    stream += _frames(P.Release("b", "bye"))
    for chunk in (1, 7, 4096, len(stream)):
        a, b = socket.socketpair()
        try:
            # A tiny read-ahead forces refills at every boundary.
            frames = P.FrameReader(b, read_ahead=16 if chunk == 7 else P.READ_AHEAD_BYTES)

            def send(a=a, chunk=chunk):
                for i in range(0, len(stream), chunk):
                    a.sendall(stream[i:i + chunk])
                a.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            assert frames.recv_message() == P.Pull(1, "a", [1])
            assert frames.recv_message() == P.ReadDone(2, "a", True)
            assert frames.recv_message() == grant
            assert frames.recv_header() == (P.KIND_DATA, len(data))
            got = bytearray(len(data))
            view, n = memoryview(got), 0
            n += frames.take_into(view)
            while n < len(data):
                n += b.recv_into(view[n:])
            assert bytes(got) == data
            assert frames.recv_message() == P.Release("b", "bye")
            with pytest.raises(P.PeerClosed, match="closed the connection"):
                frames.recv_message()
            sender.join()
        finally:
            a.close()
            b.close()


def test_frame_reader_keeps_a_half_read_frame_across_a_timeout():
    a, b = socket.socketpair()
    try:
        b.settimeout(0.05)
        frames = P.FrameReader(b)
        frame = P.encode(P.Pull(9, "r", list(range(50))))
        a.sendall(frame[:3])          # part of the header
        with pytest.raises(socket.timeout):
            frames.recv_message()
        a.sendall(frame[3:20])        # the header and part of the body
        with pytest.raises(socket.timeout):
            frames.recv_message()
        a.sendall(frame[20:])
        assert frames.recv_message() == P.Pull(9, "r", list(range(50)))
        assert frames.buffered == 0
    finally:
        a.close()
        b.close()


def test_frame_reader_takes_a_message_larger_than_its_buffer_and_refuses_bad_frames():
    a, b = socket.socketpair()
    try:
        big = P.Pull(1, "r", list(range(40_000)))   # ~120 KiB of msgpack
        frame = P.encode(big)
        assert len(frame) > 2 * 4096
        frames = P.FrameReader(b, read_ahead=4096)
        sender = threading.Thread(target=a.sendall, args=(frame + frame,))
        sender.start()
        assert frames.recv_message() == big
        assert frames.recv_message() == big
        sender.join()
        assert len(frames._buf) == 4096       # grown for the message, shrunk after
        a.sendall(P.data_header(5) + b"hello")
        with pytest.raises(P.ProtocolError, match="expected a message frame"):
            frames.recv_message()
        frames = P.FrameReader(b)
        a.sendall(b"XX" + P.encode(big)[2:])
        with pytest.raises(P.ProtocolError, match="bad frame magic"):
            frames.recv_message()
        frames = P.FrameReader(b)
        b.recv(1 << 20)
        a.sendall(P.encode(big))
        with pytest.raises(P.ProtocolError, match="oversized"):
            frames.recv_message(max_bytes=1000)
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    try:
        a.sendall(frame[:100])
        a.close()
        with pytest.raises(P.PeerClosed, match="truncated message frame"):
            P.FrameReader(b).recv_message()
    finally:
        b.close()
