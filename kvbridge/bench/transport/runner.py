# SPDX-License-Identifier: Apache-2.0
"""Process orchestration of ``kvbridge bench transport``: a producer process
per kvbridge backend, this process as the consumer, then the baselines."""

from __future__ import annotations

import statistics
import time
from multiprocessing.connection import Connection

from kvbridge.bench.common import Progress
from kvbridge.bench.transport import baselines
from kvbridge.bench.transport.memory import cache_digest, make_cache, poison_blocks
from kvbridge.bench.transport.peers import Peers
from kvbridge.bench.transport.plan import (
    PULL_TIMEOUT_S,
    SEED,
    START_TIMEOUT_S,
    Case,
    Plan,
    Timing,
    block_ids,
    series_name,
)
from kvbridge.bench.transport.procs import (
    all_failed,
    call,
    label,
    repeat,
    reply,
    result,
    stop_process,
)
from kvbridge.bench.transport.report import pull_stages

#: how long a side waits for its KV memory to be on huge pages before it measures
HUGE_PAGES_WAIT_S = 60.0

# -- helper processes (module level, so the spawn context can pickle them) ------------

def producer_main(pipe: Connection, backend: str, blocks: dict[str, int], seed: int,
                  checksum: bool = True, host: str = "127.0.0.1") -> None:
    """A kvbridge producer: one transport of ``backend`` per block shape,
    listening on ``host``.

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
                                                 TransportConfig(checksum=checksum, host=host))
            addresses[shape] = transports[shape].serve()
        for t in transports.values():
            # measure what an engine sees once its KV memory is on huge pages
            t.huge_pages.wait(HUGE_PAGES_WAIT_S)
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
                elif cmd == "serve_marks":
                    # (read Pull, sent grant) per request id, perf_counter seconds
                    shape, request_ids = args
                    wanted = set(request_ids)
                    pipe.send(("ok", {rid: (recv, sent) for rid, recv, sent
                                      in transports[shape].serve_marks if rid in wanted}))
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


class ConsumerCaches:
    """This process's caches, one per shape, reused by every backend."""

    def __init__(self, blocks: dict[str, int]):
        self.blocks = blocks
        self._caches: dict = {}

    def get(self, shape: str):
        if shape not in self._caches:
            self._caches[shape] = make_cache(shape, self.blocks[shape], None)
        return self._caches[shape]


def bench_backend(backend: str, cases: list[Case], blocks: dict[str, int],
                  consumers: ConsumerCaches, timing: Timing, prog: Progress,
                  checksum: bool = True, peers: Peers | None = None) -> list[dict]:
    from kvbridge.transport import TransferState, TransportConfig, create_transport

    shapes = {c.shape: blocks[c.shape] for c in cases}
    name = series_name(backend, checksum)
    results: list[dict] = []
    t0 = time.perf_counter()
    pipe, proc = (peers or Peers()).start("producer", backend, shapes, SEED, checksum)
    try:
        try:
            addresses = reply(pipe, proc, START_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - every case of this backend fails
            return all_failed(name, cases, str(e), prog)
        prog.step(f"{name}: producer ready ({time.perf_counter() - t0:.1f} s)")
        counter = iter(range(1 << 30))
        for shape in dict.fromkeys(c.shape for c in cases):
            shape_cases = [c for c in cases if c.shape == shape]
            cache = consumers.get(shape)
            try:
                transport = create_transport(backend, cache, TransportConfig(checksum=checksum))
                transport.huge_pages.wait(HUGE_PAGES_WAIT_S)
            except Exception as e:  # noqa: BLE001 - this shape's cases fail, the run goes on
                for case in shape_cases:
                    results.append(result(name, case, None, False,
                                           f"consumer failed to start: {type(e).__name__}: {e}"))
                    prog.step(label(name, case, results[-1]))
                continue
            try:
                for case in shape_cases:
                    remote = block_ids(case, blocks[shape], "remote")
                    local = block_ids(case, blocks[shape], "local")
                    durations: list[float] = []
                    #: request id -> the handle's stage marks and when wait() returned
                    marks: dict[str, dict[str, float]] = {}

                    def one() -> float:
                        rid = f"bench-{backend}-{shape}-{next(counter)}"
                        call(pipe, proc, "publish", shape, rid, remote)
                        poison_blocks(cache, local)
                        start = time.perf_counter()
                        handle = transport.pull(addresses[shape], rid, remote, local)
                        state = handle.wait(PULL_TIMEOUT_S)
                        woke = time.perf_counter()
                        elapsed = woke - start
                        if state != TransferState.DONE:
                            handle.cancel()
                            raise RuntimeError(f"pull ended {state.value}: {handle.error}")
                        if handle.duration_s is not None:
                            durations.append(handle.duration_s)
                        marks[rid] = {**handle.marks, "pull": start, "woke": woke}
                        return elapsed

                    try:
                        samples = repeat(one, timing)
                        timed = list(marks)[-len(samples):]  # the warm-up left out
                        stages = pull_stages([marks[r] for r in timed],
                                             call(pipe, proc, "serve_marks", shape, timed)
                                             if peers is None or not peers.remote else {},
                                             timed)
                        # The last pull overwrote poisoned blocks: compare digests,
                        # the producer's computed while ours is.
                        pipe.send(("digest", shape, remote))
                        mine = cache_digest(cache, local)
                        verified = reply(pipe, proc, 60.0) == mine
                        res = result(name, case, samples, verified,
                                      None if verified else "digest mismatch",
                                      # (the warm-up pull's duration left out)
                                      transfer_us=statistics.median(
                                          durations[-len(samples):]) * 1e6
                                      if durations else None,
                                      stages_us=stages)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        res = result(name, case, None, False, f"{type(e).__name__}: {e}")
                    results.append(res)
                    prog.step(label(name, case, res))
                # The warm-up pull connected and checked layouts once per peer.
                m = transport.metrics()
                if m.get("handshakes"):
                    for res in results[-len(shape_cases):]:
                        res["handshake_ms"] = 1e3 * m["handshake_seconds"] / m["handshakes"]
            finally:
                transport.close()
    finally:
        stop_process(proc, pipe)
    return results



def measure(plan: Plan, prog: Progress) -> list[dict]:
    """Every series of ``plan``: the kvbridge backends, then the baselines."""
    results: list[dict] = []
    blocks = plan.blocks
    consumers = ConsumerCaches(blocks)
    peers = plan.peers
    for backend, checksum in plan.runs:
        results += bench_backend(backend, plan.cases, blocks, consumers, plan.timing, prog,
                                 checksum, peers)
    del consumers  # free the consumer caches before the baselines allocate
    if "memcpy" in plan.baselines:
        results += baselines.bench_memcpy(plan.cases, plan.timing, prog)
    if "socket" in plan.baselines:
        results += baselines.bench_socket(plan.cases, plan.timing, prog, peers)
    if "nixl-raw" in plan.baselines:
        results += baselines.bench_nixl_raw(plan.cases, plan.timing, prog, peers)
    return results
