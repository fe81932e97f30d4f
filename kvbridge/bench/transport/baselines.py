# SPDX-License-Identifier: Apache-2.0
"""Baselines of ``kvbridge bench transport --baselines``: one contiguous buffer
of the same bytes moved by memcpy, a raw socket and raw NIXL."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from multiprocessing.connection import Connection

import numpy as np

from kvbridge.bench.common import Progress, fmt_bytes
from kvbridge.bench.transport.memory import digest, fill_random
from kvbridge.bench.transport.peers import Peers
from kvbridge.bench.transport.plan import (
    POISON,
    PULL_TIMEOUT_S,
    SEED,
    START_TIMEOUT_S,
    Case,
    MiB,
    Timing,
)
from kvbridge.bench.transport.procs import (
    all_failed,
    label,
    repeat,
    reply,
    result,
    stop_process,
)
from kvbridge.protocol import recv_exact_into, tune_socket

_SOCK_HDR = struct.Struct("!cQ")  # op (S: send n bytes, D: digest of n bytes, Q: quit), n


def socket_sender_main(pipe: Connection, host: str, port: int, max_bytes: int, seed: int,
                       sock_buf: int) -> None:
    """Raw-socket baseline peer: dials the measuring process at ``host:port``
    and serves byte ranges of one contiguous buffer (``pipe``: unused, it
    only ties this helper's life to its starter's)."""
    buf = np.empty(max_bytes, dtype=np.uint8)
    fill_random(buf, seed, 0)
    mv = memoryview(buf)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Buffers before connect, so the window scale is negotiated for them.
    tune_socket(sock, sock_buf)
    try:
        sock.connect((host, port))
        hdr = bytearray(_SOCK_HDR.size)
        while True:  # until the parent closes the connection (PeerClosed is an OSError)
            recv_exact_into(sock, memoryview(hdr))
            op, n = _SOCK_HDR.unpack(hdr)
            if op == b"S":
                sock.sendall(mv[:n])
            elif op == b"D":
                sock.sendall(bytes.fromhex(digest([mv[:n]])))
            else:
                return
    except OSError:
        pass  # the parent closed the connection: exit
    finally:
        sock.close()


def nixl_target_main(pipe: Connection, max_bytes: int, seed: int) -> None:
    """Raw-NIXL baseline peer: one registered contiguous buffer to READ from.

    Startup replies ``("ok", (agent metadata, buffer address))``; then
    ``("digest", n)`` and ``("stop",)``.
    """
    agent = reg = None
    try:
        from nixl._api import nixl_agent, nixl_agent_config

        buf = np.empty(max_bytes, dtype=np.uint8)
        fill_random(buf, seed, 0)
        agent = nixl_agent(f"kvbridge-bench-target-{os.getpid()}",
                           nixl_agent_config(backends=["UCX"]))
        reg = agent.register_memory([(buf.ctypes.data, max_bytes, 0, "")], "DRAM")
        pipe.send(("ok", (agent.get_agent_metadata(), buf.ctypes.data)))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        pipe.send(("error", f"nixl target failed to start: {type(e).__name__}: {e}"))
        return
    try:
        while True:
            cmd, *args = pipe.recv()
            if cmd == "digest":
                pipe.send(("ok", digest([memoryview(buf)[:args[0]]])))
            elif cmd == "stop":
                pipe.send(("ok", None))
                return
            else:
                pipe.send(("error", f"unknown command {cmd!r}"))
    except (EOFError, OSError):
        pass
    finally:
        if reg is not None:
            agent.deregister_memory(reg)


def bench_memcpy(cases: list[Case], timing: Timing, prog: Progress) -> list[dict]:
    max_bytes = max(c.nbytes for c in cases)
    src = np.empty(max_bytes, dtype=np.uint8)
    fill_random(src, SEED, 0)
    dst = np.zeros(max_bytes, dtype=np.uint8)
    # Addresses looked up once: each ``.ctypes`` access builds an object and
    # would cost more than a small copy.
    src_addr, dst_addr = src.ctypes.data, dst.ctypes.data
    results = []
    for case in cases:
        n = case.nbytes
        # Many copies per sample for small sizes: one 4 KiB memmove is shorter
        # than the timer's resolution is worth.
        inner = max(1, min(1000, (4 * MiB) // n))

        def one() -> float:
            dst[:n] = POISON
            start = time.perf_counter()
            for _ in range(inner):
                ctypes.memmove(dst_addr, src_addr, n)
            return (time.perf_counter() - start) / inner

        samples = repeat(one, timing)
        verified = bool(np.array_equal(dst[:n], src[:n]))
        res = result("memcpy", case, samples, verified, None if verified else "mismatch")
        results.append(res)
        prog.step(label("memcpy", case, res))
    return results


def bench_socket(cases: list[Case], timing: Timing, prog: Progress,
                 peers: Peers | None = None) -> list[dict]:
    from kvbridge.transport import TransportConfig

    peers = peers or Peers()
    sock_buf = TransportConfig().socket_buffer_bytes
    max_bytes = max(c.nbytes for c in cases)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tune_socket(listener, sock_buf)  # inherited by the accepted socket
    listener.bind((peers.host, 0))
    listener.listen(1)
    listener.settimeout(START_TIMEOUT_S)
    t0 = time.perf_counter()
    pipe, proc = peers.start("socket-sender", peers.host, listener.getsockname()[1], max_bytes,
                             SEED, sock_buf)
    conn: socket.socket | None = None
    results = []
    try:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            return all_failed("socket", cases, f"socket sender did not connect: {e}", prog)
        finally:
            listener.close()
        tune_socket(conn, sock_buf)
        conn.settimeout(PULL_TIMEOUT_S)
        prog.step(f"socket: sender ready ({time.perf_counter() - t0:.1f} s; "
                  f"SO_RCVBUF {fmt_bytes(conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))})")
        dst = np.zeros(max_bytes, dtype=np.uint8)
        for case in cases:
            n = case.nbytes
            view = memoryview(dst)[:n]

            def one() -> float:
                dst[:n] = POISON
                start = time.perf_counter()
                conn.sendall(_SOCK_HDR.pack(b"S", n))
                recv_exact_into(conn, view)
                return time.perf_counter() - start

            try:
                samples = repeat(one, timing)
                conn.sendall(_SOCK_HDR.pack(b"D", n))
                theirs = bytearray(20)
                recv_exact_into(conn, memoryview(theirs))
                verified = bytes(theirs).hex() == digest([view])
                res = result("socket", case, samples, verified,
                              None if verified else "digest mismatch")
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                res = result("socket", case, None, False, f"{type(e).__name__}: {e}")
            results.append(res)
            prog.step(label("socket", case, res))
    finally:
        if conn is not None:
            try:
                conn.sendall(_SOCK_HDR.pack(b"Q", 0))
            except OSError:
                pass
            conn.close()
        stop_process(proc)
        pipe.close()
    return results


def bench_nixl_raw(cases: list[Case], timing: Timing, prog: Progress,
                   peers: Peers | None = None) -> list[dict]:
    from nixl._api import nixl_agent, nixl_agent_config

    max_bytes = max(c.nbytes for c in cases)
    t0 = time.perf_counter()
    pipe, proc = (peers or Peers()).start("nixl-target", max_bytes, SEED)
    agent = reg = remote = None
    results = []
    try:
        try:
            metadata, remote_addr = reply(pipe, proc, START_TIMEOUT_S)
            agent = nixl_agent(f"kvbridge-bench-initiator-{os.getpid()}",
                               nixl_agent_config(backends=["UCX"]))
            dst = np.zeros(max_bytes, dtype=np.uint8)
            reg = agent.register_memory([(dst.ctypes.data, max_bytes, 0, "")], "DRAM")
            remote = agent.add_remote_agent(metadata)
        except Exception as e:  # noqa: BLE001 - every case fails
            return all_failed("nixl-raw", cases, f"setup failed: {type(e).__name__}: {e}",
                               prog)
        prog.step(f"nixl-raw: agents ready ({time.perf_counter() - t0:.1f} s)")
        for case in cases:
            n = case.nbytes
            local_side = agent.prep_xfer_dlist("NIXL_INIT_AGENT", [(dst.ctypes.data, n, 0)],
                                               "DRAM")
            remote_side = agent.prep_xfer_dlist(remote, [(remote_addr, n, 0)], "DRAM")

            def one() -> float:
                dst[:n] = POISON
                start = time.perf_counter()
                handle = agent.make_prepped_xfer("READ", local_side, [0], remote_side, [0])
                state = agent.transfer(handle)
                deadline = time.monotonic() + PULL_TIMEOUT_S
                while state == "PROC" and time.monotonic() < deadline:
                    state = agent.check_xfer_state(handle)
                elapsed = time.perf_counter() - start
                agent.release_xfer_handle(handle)
                if state != "DONE":
                    raise RuntimeError(f"NIXL READ ended {state}")
                return elapsed

            try:
                samples = repeat(one, timing)
                pipe.send(("digest", n))
                mine = digest([memoryview(dst)[:n]])
                verified = reply(pipe, proc, 60.0) == mine
                res = result("nixl-raw", case, samples, verified,
                              None if verified else "digest mismatch")
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                res = result("nixl-raw", case, None, False, f"{type(e).__name__}: {e}")
            finally:
                agent.release_dlist_handle(local_side)
                agent.release_dlist_handle(remote_side)
            results.append(res)
            prog.step(label("nixl-raw", case, res))
    finally:
        if agent is not None:
            if remote is not None:
                agent.remove_remote_agent(remote)
            if reg is not None:
                agent.deregister_memory(reg)
        stop_process(proc, pipe)
    return results

