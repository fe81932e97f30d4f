# SPDX-License-Identifier: Apache-2.0
"""The numbers of one ``kvbridge bench transport`` run, as data: each backend's
ratio to each baseline, the cost of end-to-end checksums, handshake times.
``render`` turns a ``Report`` into tables, text, JSON and a plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvbridge.bench.transport.plan import BASELINES, BLOCK_SHAPES, Plan, series_name

#: The stages of a pull, in order: (name, from mark, to mark). "P:" marks are the
#: producer's (same host only: perf_counter is CLOCK_MONOTONIC, one clock for
#: every process of a host).
STAGES = (
    ("submit", "pull", "asked"),         # caller: checks, handle, Pull encoded
    ("ask", "asked", "P:recv"),          # Pull written + wire + the producer's thread waking
    ("grant", "P:recv", "granted"),      # lease + grant (+ data queued) + wire + reader waking
    ("bytes", "granted", "landed"),      # the data moving into the local blocks
    ("verify", "landed", "verified"),    # checksums of the landed blocks
    ("finish", "verified", "done"),      # ReadDone written, after_pull, state DONE
    ("wake", "done", "woke"),            # the caller's wait() returning
)


def pull_stages(marks: list[dict[str, float]], served: dict[str, tuple[float, float]],
                request_ids: list[str]) -> dict[str, float] | None:
    """Median microseconds of each stage of ``STAGES`` over the pulls that
    have both marks (producer stages only with ``served``), plus ``producer``:
    the producer's own time from reading the Pull to having sent the grant."""
    if not marks:
        return None
    rows = []
    for rid, m in zip(request_ids, marks):
        row = dict(m)
        if rid in served:
            row["P:recv"], row["P:sent"] = served[rid]
        rows.append(row)
    out: dict[str, float] = {}
    for name, a, b in (*STAGES, ("producer", "P:recv", "P:sent")):
        vals = [r[b] - r[a] for r in rows if a in r and b in r]
        if vals:
            out[name] = statistics.median(vals) * 1e6
    if "P:recv" not in out and "ask" not in out:
        # No producer marks (another host): one stage from Pull written to grant read.
        vals = [r["granted"] - r["asked"] for r in rows if "granted" in r and "asked" in r]
        if vals:
            out["ask+grant"] = statistics.median(vals) * 1e6
    return out


def add_ratios(results: list[dict], backends: Sequence[str]) -> None:
    """Each backend's GB/s over each baseline's at the same bytes, in place."""
    base = {(r["backend"], r["bytes"]): r for r in results
            if r["backend"] in BASELINES and r["gbps"]}
    for r in results:
        if r["backend"] in backends and r["gbps"]:
            ratios = {b: r["gbps"] / base[(b, r["bytes"])]["gbps"] for b in BASELINES
                      if (b, r["bytes"]) in base}
            if ratios:
                r["ratios"] = ratios
                # Too noisy to judge where either side was.
                r["ratios_noisy"] = [b for b in ratios
                                     if r.get("noisy") or base[(b, r["bytes"])].get("noisy")]


def checksum_ratios(results: list[dict], backends: Sequence[str]
                    ) -> dict[str, list[tuple[int, float]]]:
    """Per backend (only those with a pair): ``(bytes, GB/s with checksums /
    GB/s without)`` by size."""
    gbps = {(r["backend"], r["bytes"]): r["gbps"] for r in results if r["gbps"]}
    out = {}
    for b in backends:
        pairs = [(n, gbps[(b, n)] / gbps[(series_name(b, False), n)])
                 for (name, n) in sorted(k for k in gbps if k[0] == b)
                 if (series_name(b, False), n) in gbps]
        if pairs:
            out[b] = pairs
    return out


def handshake_ranges(results: list[dict]) -> dict[str, tuple[float, float]]:
    """Per series that reported one: (least, most) handshake ms."""
    handshakes: dict[str, list[float]] = {}
    for r in results:
        if r.get("handshake_ms") is not None:
            handshakes.setdefault(r["backend"], []).append(r["handshake_ms"])
    return {b: (min(v), max(v)) for b, v in handshakes.items()}


@dataclass
class Report:
    """One run's plan, results and the figures computed from them."""

    plan: Plan
    results: list[dict]
    elapsed_s: float
    loadavg_start: float
    loadavg_end: float
    checksum_cost: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    handshakes: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def block_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The block shapes this run used, in ``BLOCK_SHAPES`` order."""
        blocks = self.plan.blocks
        return {s: dims for s, dims in BLOCK_SHAPES.items() if s in blocks}

    @property
    def noisy(self) -> list[dict]:
        """Measurements too noisy to judge (spread over ``NOISY_SPREAD``)."""
        return [r for r in self.results if r.get("gbps") and r.get("noisy")]

    @property
    def ok(self) -> bool:
        """Every transfer completed and verified."""
        return all(r["verified"] and r["gbps"] for r in self.results)


def build_report(plan: Plan, results: list[dict], elapsed_s: float, loadavg_start: float,
                 loadavg_end: float) -> Report:
    """Adds the baseline ratios to ``results`` (in place) and computes the rest."""
    add_ratios(results, plan.kv_series)
    cost = checksum_ratios(results, plan.backends) if len(plan.modes) == 2 else {}
    return Report(plan, results, elapsed_s, loadavg_start, loadavg_end, cost,
                  handshake_ranges(results))
