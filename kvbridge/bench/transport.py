# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench transport``: pull latency and GB/s of every transport.

What is measured: a consumer (this process) pulls N scattered KV blocks from a
producer (a second process) over 127.0.0.1 through a kvbridge backend
(``tcp``, ``cma``, ``nixl``; whichever import here) exactly as an engine would:
the producer ``publish``es a fresh request id (a lease ends once it is read),
the consumer times ``pull(...)`` up to the handle reaching DONE. That window
holds everything a pull costs the caller: the control round trip (ask, grant,
read-done), the bytes moving, and the thread hand-offs. GB/s is bytes divided by
the median latency of several repetitions after one warm-up pull (which also
does the handshake and first-touches memory).

Blocks: vLLM's CPU layout ``[kv_heads, block_size, 2*head_size]`` bf16, two
layers, block ids drawn at random (non-contiguous, unsorted) on both sides.
Total bytes run from 4 KiB to 256 MiB; the block shape follows the size:

===========  ==========================  =====================  ===============
name         layer-block shape           bytes per layer-block  used for totals
===========  ==========================  =====================  ===============
``small``    [2, 16, 16] (custom)        1 KiB                  < 256 KiB
``tiny``     [2, 128, 128] (tiny model)  64 KiB                 < 64 MiB
``llama8b``  [8, 128, 256] (Llama-3-8B)  512 KiB                >= 64 MiB
===========  ==========================  =====================  ===============

Every byte is verified: the destination blocks are poisoned before each pull,
and after the last one the SHA-1 of the pulled blocks (in pull order) on the
consumer must equal the producer's of its blocks.

``--baselines`` measures, in the same run and for the same byte counts, one
contiguous buffer moved by

* ``memcpy``: one core, ``ctypes.memmove`` in this process;
* ``socket``: a request, then ``sendall`` / ``recv_into`` a preallocated buffer
  between two processes over 127.0.0.1 (TCP_NODELAY, SO_SNDBUF/SO_RCVBUF as
  kvbridge's TCP transport sets them);
* ``nixl-raw``: two NIXL agents (UCX backend, ``UCX_NET_DEVICES=lo``) in two
  processes: metadata exchanged once, descriptor lists prepared once per size,
  then per repetition ``make_prepped_xfer("READ")``, ``transfer`` and polling
  ``check_xfer_state`` to DONE. Only where ``nixl`` imports.

Each backend's GB/s is then given as a ratio to each baseline. Results go to
``benchmarks/results/transport[-quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import multiprocessing as mp
import os
import random
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from kvbridge.bench.common import Progress, fmt_bytes, results_dir, table, write_results

# UCX would otherwise probe every interface (and pick a slow or absent one);
# one host means loopback. Set before any NIXL agent exists, here or in the
# processes spawned from here (they inherit the environment).
os.environ.setdefault("UCX_NET_DEVICES", "lo")
# NIXL logs every agent's creation at INFO on stdout, into the printed table.
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

KiB, MiB = 1 << 10, 1 << 20

#: name -> (kv_heads, block_size, head_size); vLLM CPU layout, bf16.
BLOCK_SHAPES: dict[str, tuple[int, int, int]] = {
    "small": (2, 16, 8),       # custom: 1 KiB per layer-block, for the smallest totals
    "tiny": (2, 128, 64),      # the tiny model: 64 KiB per layer-block
    "llama8b": (8, 128, 128),  # Llama-3-8B per layer: 2 x 8 x 128 x 128 x bf16 = 512 KiB
}
NUM_LAYERS = 2
FULL_SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB,
              256 * MiB]
QUICK_SIZES = [64 * KiB, 1 * MiB, 64 * MiB]
BASELINES = ("memcpy", "socket", "nixl-raw")
#: Byte written over destination blocks before every pull, so stale data from
#: an earlier repetition can never pass verification.
POISON = 0xA5
SEED = 1234
PULL_TIMEOUT_S = 120.0
#: How long a helper process may take to start (spawn, import torch / nixl).
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    """One total size: ``blocks`` blocks of ``shape`` (all layers) = ``nbytes``."""

    nbytes: int
    shape: str
    blocks: int


def layer_block_bytes(shape: str) -> int:
    heads, block_size, head_size = BLOCK_SHAPES[shape]
    return heads * block_size * 2 * head_size * 2  # bf16


def block_bytes_all_layers(shape: str) -> int:
    return NUM_LAYERS * layer_block_bytes(shape)


def auto_shape(nbytes: int) -> str:
    """The smallest totals need a small custom block (two blocks of the tiny
    model are already 256 KiB); Llama-sized blocks from 64 MiB up."""
    if nbytes < 256 * KiB:
        return "small"
    if nbytes < 64 * MiB:
        return "tiny"
    return "llama8b"


def make_plan(sizes: Sequence[int], block: str = "auto") -> tuple[list[Case], list[str]]:
    """Cases for ``sizes`` and notes on sizes that cannot be made of >= 2 whole blocks."""
    cases, skipped = [], []
    for nbytes in sizes:
        shape = auto_shape(nbytes) if block == "auto" else block
        per_block = block_bytes_all_layers(shape)
        # At least two blocks: with one there is nothing to scatter.
        if nbytes % per_block or nbytes // per_block < 2:
            skipped.append(f"{fmt_bytes(nbytes)} is not >= 2 whole {shape} blocks "
                           f"({fmt_bytes(per_block)} each)")
            continue
        cases.append(Case(nbytes, shape, nbytes // per_block))
    return cases, skipped


def parse_sizes(text: str) -> list[int]:
    """A comma-separated ``--sizes`` value."""
    return [parse_size(s) for s in text.split(",") if s.strip()]


def parse_size(text: str) -> int:
    """``4K``, ``64KiB``, ``1M``, ``256MiB``, ``1G`` or plain bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 4K, 1M, 256M)") from None


# -- memory contents and digests ----------------------------------------------------

#: Random tile length: odd, so consecutive blocks start at different phases of
#: the tile and every block differs (a misplaced block changes the digest).
_TILE = (1 << 20) + 4099


def fill_random(buf: np.ndarray, seed: int, salt: int) -> None:
    """Fill a flat uint8 array with a repeated random tile. Generating fresh
    random bytes for 512 MiB takes seconds on a small machine; copying a tile
    runs at memory speed."""
    tile = np.random.default_rng([seed, salt]).integers(0, 256, _TILE, dtype=np.uint8)
    for off in range(0, buf.size, _TILE):
        n = min(_TILE, buf.size - off)
        buf[off:off + n] = tile[:n]


def digest(buffers: Iterable) -> str:
    # SHA-1: an integrity check, not security, and the fastest hashlib hash here.
    h = hashlib.sha1(usedforsecurity=False)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


def make_cache(shape: str, num_blocks: int, seed: int | None):
    """A 2-layer paged cache of ``shape``; random contents, or zeros if ``seed`` is
    None (still written, so first-touch page faults happen here, not in a pull)."""
    import torch

    from kvbridge.cache.blocks import PagedKVCache
    from kvbridge.layout import KVLayout

    heads, block_size, head_size = BLOCK_SHAPES[shape]
    regions = []
    for layer in range(NUM_LAYERS):
        t = torch.empty((num_blocks, heads, block_size, 2 * head_size), dtype=torch.bfloat16)
        flat = t.view(torch.uint8).reshape(-1).numpy()
        if seed is None:
            flat.fill(0)
        else:
            fill_random(flat, seed, layer)
        regions.append(t)
    layout = KVLayout.from_tensors(regions, model=f"kvbridge-bench-{shape}",
                                   block_size=block_size, num_kv_heads=heads,
                                   head_size=head_size, memory_layout="LBHNC")
    return PagedKVCache(layout, regions)


def cache_digest(cache, block_ids: Sequence[int]) -> str:
    """Digest of ``block_ids`` in staging order (region-major), what a pull moves."""
    return digest(cache.block_buffers(block_ids))


def poison_blocks(cache, block_ids: Sequence[int]) -> None:
    # libc memset, not torch's fill_: a torch op over 32 Ki elements runs on its
    # OpenMP pool, whose idle threads then spin on the cores the pull needs.
    size = cache.layout.block_bytes
    for base, stride, _ in cache.region_addresses():
        for b in block_ids:
            ctypes.memset(base + b * stride, POISON, size)


# -- helper processes (module level, so the spawn context can pickle them) ------------

def _producer_main(pipe: Connection, backend: str, blocks: dict[str, int], seed: int,
                   checksum: bool = True) -> None:
    """A kvbridge producer: one transport of ``backend`` per block shape.

    Commands (tuples) -> replies ``("ok", value)`` or ``("error", message)``:
    ``("publish", shape, request_id, block_ids)``, ``("digest", shape, block_ids)``,
    ``("stop",)``. Startup replies with ``{shape: address}``.
    """
    transports: dict = {}
    caches: dict = {}
    try:
        from kvbridge.transport import TransportConfig, create_transport

        addresses = {}
        for shape, num_blocks in blocks.items():
            caches[shape] = make_cache(shape, num_blocks, seed)
            transports[shape] = create_transport(backend, caches[shape],
                                                 TransportConfig(checksum=checksum))
            addresses[shape] = transports[shape].serve()
        pipe.send(("ok", addresses))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        pipe.send(("error", f"{backend} producer failed to start: {type(e).__name__}: {e}"))
        for t in transports.values():
            t.close()
        return
    try:
        while True:
            cmd, *args = pipe.recv()
            try:
                if cmd == "publish":
                    shape, request_id, ids = args
                    transport = transports[shape]
                    # Free what earlier pulls released, as an engine would.
                    transport.poll_released()
                    transport.publish(request_id, ids)
                    pipe.send(("ok", None))
                elif cmd == "digest":
                    shape, ids = args
                    pipe.send(("ok", cache_digest(caches[shape], ids)))
                elif cmd == "stop":
                    pipe.send(("ok", None))
                    return
                else:
                    pipe.send(("error", f"unknown command {cmd!r}"))
            except Exception as e:  # noqa: BLE001 - reported to the parent
                pipe.send(("error", f"{type(e).__name__}: {e}"))
    except (EOFError, OSError):
        pass  # the parent went away: just exit
    finally:
        for t in transports.values():
            t.close()


_SOCK_HDR = struct.Struct("!cQ")  # op (S: send n bytes, D: digest of n bytes, Q: quit), n


def _socket_sender_main(port: int, max_bytes: int, seed: int, sock_buf: int) -> None:
    """Raw-socket baseline peer: serves byte ranges of one contiguous buffer."""
    buf = np.empty(max_bytes, dtype=np.uint8)
    fill_random(buf, seed, 0)
    mv = memoryview(buf)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Buffers before connect, so the window scale is negotiated for them.
    _tune_socket(sock, sock_buf)
    try:
        sock.connect(("127.0.0.1", port))
        hdr = bytearray(_SOCK_HDR.size)
        while _recv_exact(sock, memoryview(hdr)):
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


def _nixl_target_main(pipe: Connection, max_bytes: int, seed: int) -> None:
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


def _tune_socket(sock: socket.socket, sock_buf: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, sock_buf)
        except OSError:
            pass


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on a clean EOF before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("peer closed mid-message")
        got += n
    return True


# -- helper-process plumbing ------------------------------------------------------------

def _reply(pipe: Connection, proc: mp.process.BaseProcess, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    # poll() returns as soon as a reply is there; the short slices only serve
    # to notice a helper that died instead of answering.
    while not pipe.poll(0.05):
        if not proc.is_alive():
            raise RuntimeError(f"helper process exited (code {proc.exitcode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"helper process did not answer in {timeout:.0f} s")
    status, value = pipe.recv()
    if status != "ok":
        raise RuntimeError(value)
    return value


def _call(pipe: Connection, proc: mp.process.BaseProcess, *cmd: Any,
          timeout: float = 60.0) -> Any:
    pipe.send(cmd)
    return _reply(pipe, proc, timeout)


def _stop_process(proc: mp.process.BaseProcess, pipe: Connection | None = None,
                  timeout: float = 10.0) -> None:
    """Ask politely, then join; terminate and kill what does not exit."""
    if pipe is not None:
        try:
            if proc.is_alive():
                pipe.send(("stop",))
                if pipe.poll(timeout):
                    pipe.recv()
        except (EOFError, OSError):
            pass
        pipe.close()
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


# -- timing --------------------------------------------------------------------------------

@dataclass
class Timing:
    min_reps: int
    min_time: float
    max_reps: int = 200


def repeat(one: Callable[[], float], timing: Timing) -> list[float]:
    """Seconds of each repetition of ``one`` (which times itself, so setup such as
    publishing and poisoning stays out), after one warm-up call."""
    one()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < timing.min_reps or (time.perf_counter() - start < timing.min_time
                                             and len(samples) < timing.max_reps):
        samples.append(one())
    return samples


def _result(series: str, case: Case, samples: list[float] | None, verified: bool,
            error: str | None = None, **extra: Any) -> dict:
    contiguous = series in BASELINES
    out: dict[str, Any] = {
        "backend": series,
        "bytes": case.nbytes,
        # A baseline moves one contiguous buffer of the same bytes.
        "blocks": 1 if contiguous else case.blocks,
        "block": None if contiguous else case.shape,
        "layer_block_bytes": None if contiguous else layer_block_bytes(case.shape),
        "layout": "contiguous" if contiguous else "scattered",
        "gbps": None,
        "latency_us": None,
        "verified": verified,
    }
    if samples:
        lat = statistics.median(samples)
        out.update(gbps=case.nbytes / lat / 1e9, latency_us=lat * 1e6,
                   latency_min_us=min(samples) * 1e6, reps=len(samples))
    if error is not None:
        out["error"] = error or "failed"
    out.update(extra)
    return out


def _label(series: str, case: Case, res: dict) -> str:
    what = f"{series} {fmt_bytes(case.nbytes)}"
    if not res["gbps"]:
        return f"{what}: FAILED ({(res.get('error') or 'no result')[:100]})"
    return (f"{what}: {res['gbps']:.2f} GB/s, {res['latency_us']:.0f} us"
            + ("" if res["verified"] else " NOT VERIFIED"))


def _all_failed(series: str, cases: list[Case], error: str, prog: Progress) -> list[dict]:
    """A helper that never started: every case fails with its reason."""
    prog.step(f"{series}: {error}")
    results = []
    for case in cases:
        results.append(_result(series, case, None, False, error))
        prog.step(_label(series, case, results[-1]))
    return results


# -- kvbridge backends ---------------------------------------------------------------------

class ConsumerCaches:
    """This process's caches, one per shape, reused by every backend."""

    def __init__(self, blocks: dict[str, int]):
        self.blocks = blocks
        self._caches: dict = {}

    def get(self, shape: str):
        if shape not in self._caches:
            self._caches[shape] = make_cache(shape, self.blocks[shape], None)
        return self._caches[shape]


def block_ids(case: Case, num_blocks: int, side: str) -> list[int]:
    """Random, non-contiguous, unsorted ids; the same for every backend."""
    return random.Random(f"{side}-{case.shape}-{case.blocks}").sample(range(num_blocks),
                                                                     case.blocks)


def series_name(backend: str, checksum: bool) -> str:
    """``tcp`` (end-to-end checksums on, the default) or ``tcp-nocsum``."""
    return backend if checksum else f"{backend}{NO_CHECKSUM}"


NO_CHECKSUM = "-nocsum"


def bench_backend(backend: str, cases: list[Case], blocks: dict[str, int],
                  consumers: ConsumerCaches, timing: Timing, prog: Progress,
                  checksum: bool = True) -> list[dict]:
    from kvbridge.transport import TransferState, TransportConfig, create_transport

    ctx = mp.get_context("spawn")
    pipe, child = ctx.Pipe()
    shapes = {c.shape: blocks[c.shape] for c in cases}
    name = series_name(backend, checksum)
    proc = ctx.Process(target=_producer_main, args=(child, backend, shapes, SEED, checksum),
                       daemon=True, name=f"kvbridge-bench-{name}-producer")
    results: list[dict] = []
    t0 = time.perf_counter()
    proc.start()
    child.close()
    try:
        try:
            addresses = _reply(pipe, proc, START_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - every case of this backend fails
            return _all_failed(name, cases, str(e), prog)
        prog.step(f"{name}: producer ready ({time.perf_counter() - t0:.1f} s)")
        counter = iter(range(1 << 30))
        for shape in dict.fromkeys(c.shape for c in cases):
            shape_cases = [c for c in cases if c.shape == shape]
            cache = consumers.get(shape)
            try:
                transport = create_transport(backend, cache, TransportConfig(checksum=checksum))
            except Exception as e:  # noqa: BLE001 - this shape's cases fail, the run goes on
                for case in shape_cases:
                    results.append(_result(name, case, None, False,
                                           f"consumer failed to start: {type(e).__name__}: {e}"))
                    prog.step(_label(name, case, results[-1]))
                continue
            try:
                for case in shape_cases:
                    remote = block_ids(case, blocks[shape], "remote")
                    local = block_ids(case, blocks[shape], "local")
                    durations: list[float] = []

                    def one() -> float:
                        rid = f"bench-{backend}-{shape}-{next(counter)}"
                        _call(pipe, proc, "publish", shape, rid, remote)
                        poison_blocks(cache, local)
                        start = time.perf_counter()
                        handle = transport.pull(addresses[shape], rid, remote, local)
                        state = handle.wait(PULL_TIMEOUT_S)
                        elapsed = time.perf_counter() - start
                        if state != TransferState.DONE:
                            handle.cancel()
                            raise RuntimeError(f"pull ended {state.value}: {handle.error}")
                        if handle.duration_s is not None:
                            durations.append(handle.duration_s)
                        return elapsed

                    try:
                        samples = repeat(one, timing)
                        # The last pull overwrote poisoned blocks: compare digests,
                        # the producer's computed while ours is.
                        pipe.send(("digest", shape, remote))
                        mine = cache_digest(cache, local)
                        verified = _reply(pipe, proc, 60.0) == mine
                        res = _result(name, case, samples, verified,
                                      None if verified else "digest mismatch",
                                      # (the warm-up pull's duration left out)
                                      transfer_us=statistics.median(
                                          durations[-len(samples):]) * 1e6
                                      if durations else None)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        res = _result(name, case, None, False, f"{type(e).__name__}: {e}")
                    results.append(res)
                    prog.step(_label(name, case, res))
                # The warm-up pull connected and checked layouts once per peer.
                m = transport.metrics()
                if m.get("handshakes"):
                    for res in results[-len(shape_cases):]:
                        res["handshake_ms"] = 1e3 * m["handshake_seconds"] / m["handshakes"]
            finally:
                transport.close()
    finally:
        _stop_process(proc, pipe)
    return results


# -- baselines -------------------------------------------------------------------------------

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
        res = _result("memcpy", case, samples, verified, None if verified else "mismatch")
        results.append(res)
        prog.step(_label("memcpy", case, res))
    return results


def bench_socket(cases: list[Case], timing: Timing, prog: Progress) -> list[dict]:
    from kvbridge.transport import TransportConfig

    sock_buf = TransportConfig().socket_buffer_bytes
    max_bytes = max(c.nbytes for c in cases)
    ctx = mp.get_context("spawn")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _tune_socket(listener, sock_buf)  # inherited by the accepted socket
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(START_TIMEOUT_S)
    proc = ctx.Process(target=_socket_sender_main,
                       args=(listener.getsockname()[1], max_bytes, SEED, sock_buf),
                       daemon=True, name="kvbridge-bench-socket-sender")
    t0 = time.perf_counter()
    proc.start()
    conn: socket.socket | None = None
    results = []
    try:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            return _all_failed("socket", cases, f"socket sender did not connect: {e}", prog)
        finally:
            listener.close()
        _tune_socket(conn, sock_buf)
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
                _recv_exact(conn, view)
                return time.perf_counter() - start

            try:
                samples = repeat(one, timing)
                conn.sendall(_SOCK_HDR.pack(b"D", n))
                theirs = bytearray(20)
                _recv_exact(conn, memoryview(theirs))
                verified = bytes(theirs).hex() == digest([view])
                res = _result("socket", case, samples, verified,
                              None if verified else "digest mismatch")
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                res = _result("socket", case, None, False, f"{type(e).__name__}: {e}")
            results.append(res)
            prog.step(_label("socket", case, res))
    finally:
        if conn is not None:
            try:
                conn.sendall(_SOCK_HDR.pack(b"Q", 0))
            except OSError:
                pass
            conn.close()
        _stop_process(proc)
    return results


def nixl_importable() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


def bench_nixl_raw(cases: list[Case], timing: Timing, prog: Progress) -> list[dict]:
    from nixl._api import nixl_agent, nixl_agent_config

    max_bytes = max(c.nbytes for c in cases)
    ctx = mp.get_context("spawn")
    pipe, child = ctx.Pipe()
    proc = ctx.Process(target=_nixl_target_main, args=(child, max_bytes, SEED), daemon=True,
                       name="kvbridge-bench-nixl-target")
    t0 = time.perf_counter()
    proc.start()
    child.close()
    agent = reg = remote = None
    results = []
    try:
        try:
            metadata, remote_addr = _reply(pipe, proc, START_TIMEOUT_S)
            agent = nixl_agent(f"kvbridge-bench-initiator-{os.getpid()}",
                               nixl_agent_config(backends=["UCX"]))
            dst = np.zeros(max_bytes, dtype=np.uint8)
            reg = agent.register_memory([(dst.ctypes.data, max_bytes, 0, "")], "DRAM")
            remote = agent.add_remote_agent(metadata)
        except Exception as e:  # noqa: BLE001 - every case fails
            return _all_failed("nixl-raw", cases, f"setup failed: {type(e).__name__}: {e}",
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
                verified = _reply(pipe, proc, 60.0) == mine
                res = _result("nixl-raw", case, samples, verified,
                              None if verified else "digest mismatch")
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                res = _result("nixl-raw", case, None, False, f"{type(e).__name__}: {e}")
            finally:
                agent.release_dlist_handle(local_side)
                agent.release_dlist_handle(remote_side)
            results.append(res)
            prog.step(_label("nixl-raw", case, res))
    finally:
        if agent is not None:
            if remote is not None:
                agent.remove_remote_agent(remote)
            if reg is not None:
                agent.deregister_memory(reg)
        _stop_process(proc, pipe)
    return results


# -- report ----------------------------------------------------------------------------------

def checksum_cost(results: list[dict], backends: Sequence[str]) -> list[str]:
    """One line per backend: throughput with checksums over without, per size."""
    gbps = {(r["backend"], r["bytes"]): r["gbps"] for r in results if r["gbps"]}
    lines = []
    for b in backends:
        parts = [f"{fmt_bytes(n)} {gbps[(b, n)] / gbps[(series_name(b, False), n)]:.2f}x"
                 for (name, n) in sorted(k for k in gbps if k[0] == b)
                 if (series_name(b, False), n) in gbps]
        if parts:
            lines.append(f"checksum cost, {b}: GB/s with / without checksums: "
                         + ", ".join(parts))
    return lines


def add_ratios(results: list[dict], backends: Sequence[str]) -> None:
    """Each backend's GB/s over each baseline's at the same bytes, in place."""
    base = {(r["backend"], r["bytes"]): r["gbps"] for r in results
            if r["backend"] in BASELINES and r["gbps"]}
    for r in results:
        if r["backend"] in backends and r["gbps"]:
            ratios = {b: r["gbps"] / base[(b, r["bytes"])] for b in BASELINES
                      if (b, r["bytes"]) in base}
            if ratios:
                r["ratios"] = ratios


def render(cases: list[Case], series: list[str], backends: list[str], results: list[dict]
           ) -> str:
    by = {(r["backend"], r["bytes"]): r for r in results}
    rows = []
    for case in cases:
        row: list[object] = [fmt_bytes(case.nbytes),
                             f"{case.shape} {fmt_bytes(layer_block_bytes(case.shape))}",
                             case.blocks]
        bad = []
        for s in series:
            r = by.get((s, case.nbytes))
            if r is None or not r["gbps"]:
                row.append("FAILED")
                bad.append(s)
                continue
            row.append(f"{r['gbps']:.2f} ({r['latency_us']:.0f})")
            if not r["verified"]:
                bad.append(s)
        row.append("yes" if not bad else "NO: " + ",".join(bad))
        rows.append(row)
    main = table(["bytes", "block", "blocks", *[f"{s} GB/s (us)" for s in series],
                  "verified"], rows)
    handshakes = {}
    for r in results:
        if r.get("handshake_ms") is not None:
            handshakes.setdefault(r["backend"], []).append(r["handshake_ms"])
    if handshakes:
        main += "\n\nhandshake (connect, authenticate, compare layouts; once per peer), ms: " + \
            ", ".join(f"{b} {min(v):.1f}-{max(v):.1f}" for b, v in handshakes.items())
    baselines = [b for b in BASELINES if b in series]
    if not baselines:
        return main
    pairs = [(b, base) for b in backends for base in baselines]
    ratio_rows = []
    for case in cases:
        row = [fmt_bytes(case.nbytes)]
        for b, base in pairs:
            ratio = (by.get((b, case.nbytes)) or {}).get("ratios", {}).get(base)
            row.append("-" if ratio is None else f"{ratio:.2f}")
        ratio_rows.append(row)
    ratios = table(["bytes", *[f"{b}/{base}" for b, base in pairs]], ratio_rows)
    return f"{main}\n\nGB/s ratios (kvbridge backend / baseline, same run):\n{ratios}"


def plot(results: list[dict], series: list[str], path: Path, title: str) -> Path | None:
    """GB/s and latency against bytes, one line per backend; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    # A bare Figure (no pyplot): no GUI backend, no global state touched.
    fig = Figure(figsize=(13, 5), layout="constrained")
    ax_bw, ax_lat = fig.subplots(1, 2)
    sizes = sorted({r["bytes"] for r in results})
    for s in series:
        pts = sorted((r["bytes"], r["gbps"], r["latency_us"]) for r in results
                     if r["backend"] == s and r["gbps"])
        if not pts:
            continue
        xs, bw, lat = zip(*pts)
        style = dict(linestyle="--", marker="s") if s in BASELINES else dict(marker="o")
        ax_bw.plot(xs, bw, label=s, **style)
        ax_lat.plot(xs, lat, label=s, **style)
    for ax in (ax_bw, ax_lat):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([fmt_bytes(x).replace(".0 ", " ") for x in sizes], rotation=45)
        ax.set_xlabel("bytes per transfer")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    ax_bw.set_ylabel("GB/s (median)")
    ax_bw.set_title("throughput")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency, us (median)")
    ax_lat.set_title("latency")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# -- entry points ----------------------------------------------------------------------------

def _add(parser: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    # The ``bench`` parser may already define the flags every benchmark shares
    # (--quick, --json); reuse those instead of clashing with them.
    if any(f in parser._option_string_actions for f in flags):
        return
    parser.add_argument(*flags, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvbridge bench transport``."""
    _add(parser, "--quick", action="store_true",
         help="64 KiB, 1 MiB and 64 MiB only (under a minute)")
    _add(parser, "--json", metavar="PATH", help="also write the results here")
    _add(parser, "--baselines", action="store_true",
         help="also measure memcpy, a raw socket and raw NIXL (if installed) on the same "
              "bytes, and give each backend's ratio to them")
    _add(parser, "--backends", metavar="LIST",
         help="comma-separated kvbridge backends (default: every available one)")
    _add(parser, "--sizes", metavar="LIST", type=parse_sizes,
         help="comma-separated total sizes, e.g. 4K,1M,256M (default: 4 KiB ... 256 MiB "
              "in steps of 4x)")
    _add(parser, "--block", choices=["auto", *BLOCK_SHAPES], default="auto",
         help="block shape for every size (default: by size, see the module docs)")
    _add(parser, "--checksum", choices=["both", "on", "off"], default="both",
         help="end-to-end KV checksums: measure each backend with them (the default "
              "config) and without (series NAME-nocsum), or only one way [both]")
    _add(parser, "--reps", type=int, default=5,
         help="least repetitions per measurement; the median is reported [5]")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every transfer completed and verified."""
    from kvbridge.transport import ALIASES, BACKENDS, available

    quick = bool(getattr(args, "quick", False))
    with_baselines = bool(getattr(args, "baselines", False))
    here = available()
    requested = getattr(args, "backends", None)
    if requested:
        backends = []
        for name in (n.strip() for n in requested.split(",") if n.strip()):
            key = ALIASES.get(name, name)
            if key not in BACKENDS:
                print(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}",
                      file=sys.stderr)
                return 2
            if key not in here:
                print(f"backend {key!r} is not available here (its dependency does not "
                      f"import); available: {here}", file=sys.stderr)
                return 2
            if key not in backends:
                backends.append(key)
    else:
        backends = here
    sizes_arg = getattr(args, "sizes", None)
    if isinstance(sizes_arg, str):
        sizes_arg = parse_sizes(sizes_arg)
    sizes = sizes_arg or (QUICK_SIZES if quick else FULL_SIZES)
    cases, skipped = make_plan(sorted(set(sizes)), getattr(args, "block", "auto") or "auto")
    for note in skipped:
        print(f"skipping {note}", file=sys.stderr)
    if not cases:
        print("nothing to measure", file=sys.stderr)
        return 2
    baselines: list[str] = []
    notes: list[str] = []
    if with_baselines:
        baselines = ["memcpy", "socket"]
        if nixl_importable():
            baselines.append("nixl-raw")
        else:
            notes.append("nixl-raw skipped: nixl does not import here")
    modes = {"both": [True, False], "on": [True], "off": [False]}[
        getattr(args, "checksum", None) or "both"]
    runs = [(b, c) for b in backends for c in modes]
    kv_series = [series_name(b, c) for b, c in runs]
    series = [*kv_series, *baselines]
    timing = Timing(min_reps=max(1, getattr(args, "reps", 5) or 5),
                    min_time=0.15 if quick else 0.5)
    # Scattered ids need room: caches hold twice the most blocks a case pulls.
    blocks = {shape: max(4, 2 * max(c.blocks for c in cases if c.shape == shape))
              for shape in dict.fromkeys(c.shape for c in cases)}

    startups = len(runs) + sum(b != "memcpy" for b in baselines)
    prog = Progress(startups + len(series) * len(cases))
    started = time.perf_counter()
    # Other work on the machine skews every number; keep the load next to them.
    load_start = os.getloadavg()[0]
    results: list[dict] = []
    consumers = ConsumerCaches(blocks)
    for backend, checksum in runs:
        results += bench_backend(backend, cases, blocks, consumers, timing, prog, checksum)
    del consumers  # free the consumer caches before the baselines allocate
    if "memcpy" in baselines:
        results += bench_memcpy(cases, timing, prog)
    if "socket" in baselines:
        results += bench_socket(cases, timing, prog)
    if "nixl-raw" in baselines:
        results += bench_nixl_raw(cases, timing, prog)
    elapsed = time.perf_counter() - started
    add_ratios(results, kv_series)

    with_checksums = [series_name(b, True) for b in backends] if True in modes else kv_series
    text = render(cases, series, with_checksums, results)
    cost = checksum_cost(results, backends) if len(modes) == 2 else []
    print(text)
    shape_notes = ", ".join(
        f"{s} = [{h}, {bs}, {2 * hs}] ({fmt_bytes(layer_block_bytes(s))})"
        for s, (h, bs, hs) in BLOCK_SHAPES.items() if s in blocks)
    footer = [
        f"cells: GB/s (latency in us), median of >= {timing.min_reps} repetitions after a "
        "warm-up; bytes = blocks x 2 layers x layer-block.",
        f"block: layer-block [kv_heads, block_size, 2*head_size] bf16: {shape_notes}.",
        f"kvbridge backends ({', '.join(backends) or 'none'}): producer process -> consumer "
        "process over 127.0.0.1, random non-contiguous block ids on both sides, a fresh "
        "request id per pull; latency = pull() to DONE, the consumer's checksum "
        f"verification included (series {NO_CHECKSUM}: checksums off); the producer "
        "digests blocks when it publishes, outside the timed pull.",
        *cost,
    ]
    if baselines:
        footer.append("baselines move one contiguous buffer of the same bytes: memcpy = "
                      "one-core memmove, repeated on the same buffers (hot in cache up to a "
                      "few MiB); socket = request + sendall/recv_into between two processes; "
                      "nixl-raw = make_prepped_xfer READ + poll, two NIXL agents (UCX).")
    footer += notes
    footer.append(f"total time {elapsed:.1f} s; 1-min load average {load_start:.2f} at the "
                  f"start, {os.getloadavg()[0]:.2f} at the end; "
                  f"UCX_NET_DEVICES={os.environ.get('UCX_NET_DEVICES')}")
    print("\n" + "\n".join(footer))

    name = "transport" + ("-quick" if quick else "")
    png = plot(results, series, results_dir() / f"{name}.png",
               f"kvbridge bench transport{' --quick' if quick else ''}: producer -> consumer "
               f"on 127.0.0.1 ({os.cpu_count()} CPUs)")
    payload = {
        "backends": backends,
        "series": kv_series,
        "checksum_cost": cost,
        "baselines": baselines,
        "layers": NUM_LAYERS,
        "block_shapes": {s: {"kv_heads": h, "block_size": bs, "head_size": hs,
                             "layer_block_bytes": layer_block_bytes(s)}
                         for s, (h, bs, hs) in BLOCK_SHAPES.items() if s in blocks},
        "min_reps": timing.min_reps,
        "elapsed_s": elapsed,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
        "plot": png.name if png else None,
        "results": results,
    }
    out = write_results(name, payload, text + "\n\n" + "\n".join(footer),
                        getattr(args, "json", None))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""), file=sys.stderr)
    ok = all(r["verified"] and r["gbps"] for r in results)
    return 0 if ok else 1
