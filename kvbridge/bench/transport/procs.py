# SPDX-License-Identifier: Apache-2.0
"""Helper-process plumbing and measurement records shared by the kvbridge
backends (``runner``) and the baselines (``baselines``) of ``kvbridge bench
transport``."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from kvbridge.bench.common import Progress, fmt_bytes
from kvbridge.bench.transport.plan import (
    BASELINES,
    NOISY_SPREAD,
    Case,
    Timing,
    layer_block_bytes,
)


def reply(pipe: Connection, proc: mp.process.BaseProcess, timeout: float) -> Any:
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


def call(pipe: Connection, proc: mp.process.BaseProcess, *cmd: Any,
          timeout: float = 60.0) -> Any:
    pipe.send(cmd)
    return reply(pipe, proc, timeout)


def stop_process(proc: mp.process.BaseProcess, pipe: Connection | None = None,
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


def spread(samples: list[float]) -> float | None:
    """Interquartile range over the median (0.1 = the middle half of the
    samples lies within 10 % of the median); None for fewer than 4 samples."""
    if len(samples) < 4:
        return None
    q1, med, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / med if med > 0 else None


def repeat(one: Callable[[], float], timing: Timing) -> list[float]:
    """Seconds of each repetition of ``one`` (which times itself, so setup such as
    publishing and poisoning stays out), after one warm-up call: see ``Timing``."""
    one()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < timing.max_reps:
        elapsed = time.perf_counter() - start
        if len(samples) >= timing.min_reps and elapsed >= timing.min_time:
            noisy = (spread(samples) or 0.0) > NOISY_SPREAD
            if not noisy or elapsed >= timing.settle_time:
                break
        samples.append(one())
    return samples


def result(series: str, case: Case, samples: list[float] | None, verified: bool,
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
        sp = spread(samples)
        out.update(gbps=case.nbytes / lat / 1e9, latency_us=lat * 1e6,
                   latency_min_us=min(samples) * 1e6, reps=len(samples), spread=sp,
                   noisy=sp is None or sp > NOISY_SPREAD)
    if error is not None:
        out["error"] = error or "failed"
    out.update(extra)
    return out


def label(series: str, case: Case, res: dict) -> str:
    what = f"{series} {fmt_bytes(case.nbytes)}"
    if not res["gbps"]:
        return f"{what}: FAILED ({(res.get('error') or 'no result')[:100]})"
    return (f"{what}: {res['gbps']:.2f} GB/s, {res['latency_us']:.0f} us"
            + ("" if res["verified"] else " NOT VERIFIED"))


def all_failed(series: str, cases: list[Case], error: str, prog: Progress) -> list[dict]:
    """A helper that never started: every case fails with its reason."""
    prog.step(f"{series}: {error}")
    results = []
    for case in cases:
        results.append(result(series, case, None, False, error))
        prog.step(label(series, case, results[-1]))
    return results

