# SPDX-License-Identifier: Apache-2.0
"""The numbers of one ``kvbridge bench transport`` run, as data: each backend's
ratio to each baseline, the cost of end-to-end checksums, handshake times.
``render`` turns a ``Report`` into tables, text, JSON and a plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvbridge.bench.transport.plan import BASELINES, BLOCK_SHAPES, Plan, series_name


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
