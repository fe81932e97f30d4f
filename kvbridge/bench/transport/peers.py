# SPDX-License-Identifier: Apache-2.0
"""Where ``kvbridge bench transport`` runs its helper processes (the kvbridge
producers and the baselines' far ends): on this host, or on another host that
runs ``kvbridge bench transport --listen ADDR:PORT``.

Either way a helper is driven over a ``multiprocessing`` ``Connection`` with
the same commands and replies, so the measuring code does not know which. The
remote one is a ``multiprocessing.connection`` over TCP, authenticated with
``$KVBRIDGE_SECRET`` (or a fixed key when unset: it keeps strangers' stray
connections out, it is no security), and each helper runs in its own process
on the listening host, as it does locally.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import sys
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Callable

#: authkey when $KVBRIDGE_SECRET is unset (see the module docs)
_DEFAULT_KEY = b"kvbridge-bench-transport"


def _authkey() -> bytes:
    return os.environ.get("KVBRIDGE_SECRET", "").encode() or _DEFAULT_KEY


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _targets() -> dict[str, Callable]:
    """Helper entry points by name (what a remote start may ask for)."""
    from kvbridge.bench.transport import baselines, runner

    return {"producer": runner.producer_main, "socket-sender": baselines.socket_sender_main,
            "nixl-target": baselines.nixl_target_main}


class RemoteProcess:
    """A helper on the listening host, seen through its connection: what the
    measuring code asks of a local ``Process`` (``is_alive``, ``join``...)."""

    def __init__(self, conn: Connection, name: str):
        self.conn = conn
        self.name = name
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return not self.conn.closed

    def join(self, timeout: float | None = None) -> None:
        pass  # the listening host reaps its own processes

    def terminate(self) -> None:
        self.conn.close()

    kill = terminate


class Peers:
    """Starts helpers; ``host`` is the address they reach this process at."""

    #: the address helpers dial back to (the socket baseline's listener)
    host = "127.0.0.1"
    #: what the report says the bytes crossed
    link = "127.0.0.1"
    #: kvbridge backends that can reach the helpers (cma: same host only)
    remote = False

    def start(self, target: str, *args: Any) -> tuple[Connection, Any]:
        """Start helper ``target`` with ``args``; returns (connection, process)."""
        ctx = mp.get_context("spawn")
        pipe, child = ctx.Pipe()
        proc = ctx.Process(target=_targets()[target], args=(child, *args), daemon=True,
                           name=f"kvbridge-bench-{target}")
        proc.start()
        child.close()
        return pipe, proc


class RemotePeers(Peers):
    """Helpers on the host that runs ``--listen``; ``address`` is its HOST:PORT."""

    remote = True

    def __init__(self, address: str):
        self.address = parse_address(address)
        self.link = f"{self.address[0]} (from this host's {self.local_host()})"
        self.host = self.local_host()

    def local_host(self) -> str:
        """This host's address on the route to the listener."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(self.address)  # UDP: picks the route, sends nothing
            return s.getsockname()[0]

    def start(self, target: str, *args: Any) -> tuple[Connection, Any]:
        conn = Client(self.address, authkey=_authkey())
        conn.send(("start", target, args))
        return conn, RemoteProcess(conn, target)


def serve(address: str, out=sys.stderr) -> int:
    """``--listen``: run the helpers a ``--connect`` run asks for, one process
    each, until interrupted. The producers' transports bind to the listening
    address (their consumers dial it)."""
    host, port = parse_address(address)
    ctx = mp.get_context("spawn")
    procs: list = []
    # SIGTERM (kill PID) ends the loop like Ctrl-C: the helpers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Listener((host, port), authkey=_authkey()) as listener:
        print(f"kvbridge bench transport: serving helpers on {host}:{port} (Ctrl-C stops)",
              file=out, flush=True)
        try:
            while True:
                try:
                    conn = listener.accept()
                    kind, target, args = conn.recv()
                except (OSError, EOFError, ValueError) as e:  # a bad or unauthenticated peer
                    print(f"  refused a connection: {type(e).__name__}: {e}", file=out)
                    continue
                if kind != "start" or target not in _targets():
                    conn.close()
                    continue
                if target == "producer":
                    args = (*args[:4], host)  # bind where the consumer can dial
                proc = ctx.Process(target=_targets()[target], args=(conn, *args),
                                   daemon=True, name=f"kvbridge-bench-{target}")
                proc.start()
                conn.close()  # the child holds its own copy
                procs = [p for p in procs if p.is_alive()] + [proc]
                print(f"  started {target} (pid {proc.pid})", file=out, flush=True)
        except KeyboardInterrupt:
            return 0
        finally:
            for p in procs:
                p.terminate()
                p.join(5)
