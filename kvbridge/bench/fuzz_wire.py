# SPDX-License-Identifier: Apache-2.0
"""One fuzz input on the wire: send it, shut the write side, judge the reply.

Outcome labels (``Outcome.label``), judged on what the producer sends after
the point of interest (after its ``HandshakeAccept`` for post-handshake
inputs) until it closes the connection:

* ``error:<code>`` - an ``Error`` message (the first one), e.g. ``error:protocol``;
* ``pull:<code>`` - a ``PullError`` (``pull:not_published``, ``pull:blocks``);
* ``grant`` - a ``PullGrant`` (a valid pull of a published request);
* ``accept`` - a ``HandshakeAccept`` (correct only after a correct handshake);
* ``closed`` - closed (or reset) without any of the above;
* ``hung`` - not closed within the deadline after the input was sent and the
  write side shut down (the producer reads EOF then: it must close);
* ``bad_reply`` - bytes that are not kvbridge frames;
* ``leak`` - the producer's layout (an ``Error`` carrying it, a
  ``HandshakeAccept``) sent to a peer whose MAC did not verify.

A producer reads EOF once the write side is shut, so every outcome but
``hung`` arrives promptly; nothing here waits on the producer's own timeouts.
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass, field

from kvbridge import protocol as P
from kvbridge.bench.fuzz_cases import Case, Target


@dataclass
class Outcome:
    label: str
    codes: list = field(default_factory=list)
    #: the producer reset the connection (its reply may have been lost)
    reset: bool = False
    seconds: float = 0.0
    #: set when the handshake of a post-handshake input did not complete
    note: str = ""


class _Wire:
    """Buffered frame reader with a deadline; tells EOF, reset and silence apart."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.reset = False

    def _fill(self, deadline: float) -> bool:
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            raise TimeoutError from None
        except (ConnectionResetError, ConnectionAbortedError):
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def next(self, deadline: float):
        """The next message (DATA frames skipped); None at EOF. Raises
        ``TimeoutError`` past ``deadline`` and ``ValueError`` on a bad frame."""
        while True:
            while len(self.buf) < P.HEADER.size:
                if not self._fill(deadline):
                    if self.buf:
                        raise ValueError(f"{len(self.buf)} stray bytes before EOF")
                    return None
            magic, kind, length = P.HEADER.unpack_from(self.buf)
            if magic != P.MAGIC or kind not in (P.KIND_MSG, P.KIND_DATA):
                raise ValueError(f"not a kvbridge frame: {bytes(self.buf[:16]).hex()}")
            while len(self.buf) < P.HEADER.size + length:
                if not self._fill(deadline):
                    raise ValueError("truncated frame before EOF")
            body = bytes(self.buf[P.HEADER.size:P.HEADER.size + length])
            del self.buf[:P.HEADER.size + length]
            if kind == P.KIND_MSG:
                try:
                    return P.decode(body)
                except P.ProtocolError as e:
                    raise ValueError(str(e)) from None


def _mac(case: Case, target: Target, server_nonce: bytes, rng: random.Random) -> bytes:
    secret, cn, sn = target.secret, case.nonce, server_nonce
    ok = P.mac(secret, b"client", sn, cn)
    return {
        "ok": ok,
        "wrong_secret": P.mac(secret + b"?", b"client", sn, cn),
        "empty": b"",
        "random": rng.randbytes(32),
        "truncated": ok[:rng.randrange(len(ok))],
        "reflected": P.mac(secret, b"server", cn, sn),  # the producer's own proof
        "stale": P.mac(secret, b"client", rng.randbytes(16), cn),  # another challenge's
        "flipped": bytes([ok[0] ^ 1]) + ok[1:],
        "extended": ok + b"\x00",
    }[case.shake.mac]


def label(msgs: list) -> tuple[str, list]:
    """The outcome label of the messages a producer sent (see the module docstring)."""
    codes = [f"error:{m.code}" for m in msgs if isinstance(m, P.Error)] + \
        [f"pull:{m.code}" for m in msgs if isinstance(m, P.PullError)]
    if codes:
        return codes[0], codes
    if any(isinstance(m, P.PullGrant) for m in msgs):
        return "grant", codes
    if any(isinstance(m, P.HandshakeAccept) for m in msgs):
        return "accept", codes
    return "closed", codes


def run_case(address: str, case: Case, target: Target, deadline_s: float = 2.0) -> Outcome:
    """Send ``case`` on a fresh connection, shut the write side, judge the reply."""
    host, _, port = address.rpartition(":")
    rng = random.Random(case.nonce)
    t0 = time.monotonic()
    out = Outcome("closed")
    sock = socket.create_connection((host, int(port)), timeout=deadline_s)
    wire = _Wire(sock)
    msgs: list = []
    try:
        if case.shake is not None:
            deadline = time.monotonic() + deadline_s
            sh = case.shake
            sock.sendall(P.encode(P.Hello(P.PROTOCOL_VERSION, case.nonce, "kvbridge-fuzz")))
            ch = wire.next(deadline)
            if not isinstance(ch, P.Challenge):
                out.note = f"expected Challenge, got {type(ch).__name__}"
                msgs += [ch] if ch is not None else []
                raise _Done
            hs = sh.replace or P.encode(P.Handshake(
                sh.layout or target.layout, _mac(case, target, ch.nonce, rng),
                target.backend if sh.backend is None else sh.backend,
                target.info if sh.info is None else sh.info))
            sock.sendall(hs)
            if sh.wait_accept:
                acc = wire.next(deadline)
                if not (isinstance(acc, P.HandshakeAccept)
                        and P.verify_mac(target.secret, acc.mac, b"server", case.nonce, ch.nonce)):
                    out.note = f"handshake not accepted: {acc!r}"[:300]
                    msgs += [acc] if acc is not None else []
                    raise _Done
        try:
            sock.sendall(case.payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the producer closed first: its reply (if any) is still readable
        deadline = time.monotonic() + deadline_s
        while (m := wire.next(deadline)) is not None:
            msgs.append(m)
    except _Done:
        try:
            sock.shutdown(socket.SHUT_WR)
            while (m := wire.next(time.monotonic() + deadline_s)) is not None:
                msgs.append(m)
        except (OSError, TimeoutError, ValueError):
            pass
    except TimeoutError:
        out.label = "hung"
    except ValueError as e:
        out.label, out.note = "bad_reply", str(e)[:300]
    finally:
        sock.close()
    if out.label == "closed":
        out.label, out.codes = label([m for m in msgs if not isinstance(m, P.Challenge)])
    authenticated = case.shake is not None and case.shake.mac == "ok" and not case.shake.replace
    if not authenticated and any(getattr(m, "layout", None) is not None for m in msgs):
        # Nothing about the producer may reach a peer whose MAC did not verify.
        out.label, out.note = "leak", f"layout sent before authentication: {out.label}"
    out.reset = wire.reset
    out.seconds = time.monotonic() - t0
    return out


class _Done(Exception):
    """The handshake of a post-handshake input ended early: judge what came."""
