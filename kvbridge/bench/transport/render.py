# SPDX-License-Identifier: Apache-2.0
"""How ``kvbridge bench transport`` shows a ``Report``: the printed tables and
footer (also the markdown file's body), the JSON payload and the plot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kvbridge.bench.common import fmt_bytes, table
from kvbridge.bench.transport.plan import (
    BASELINES,
    NO_CHECKSUM,
    NOISY_SPREAD,
    NUM_LAYERS,
    layer_block_bytes,
)
from kvbridge.bench.transport.report import STAGES, Report


def tables(report: Report) -> str:
    """The results table, the handshake line and (with baselines) the ratio table."""
    plan, results = report.plan, report.results
    cases, series, backends = plan.cases, plan.series, plan.with_checksums
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
            row.append(f"{r['gbps']:.2f} ({r['latency_us']:.0f})" + ("~" if r.get("noisy")
                                                                     else ""))
            if not r["verified"]:
                bad.append(s)
        row.append("yes" if not bad else "NO: " + ",".join(bad))
        rows.append(row)
    main = table(["bytes", "block", "blocks", *[f"{s} GB/s (us)" for s in series],
                  "verified"], rows)
    if report.handshakes:
        main += "\n\nhandshake (connect, authenticate, compare layouts; once per peer), ms: " + \
            ", ".join(f"{b} {lo:.1f}-{hi:.1f}" for b, (lo, hi) in report.handshakes.items())
    stages = stage_table(report)
    if stages:
        main += "\n\n" + stages
    baselines = [b for b in BASELINES if b in series]
    if not baselines:
        return main
    pairs = [(b, base) for b in backends for base in baselines]
    ratio_rows = []
    for case in cases:
        row = [fmt_bytes(case.nbytes)]
        for b, base in pairs:
            r = by.get((b, case.nbytes)) or {}
            ratio = r.get("ratios", {}).get(base)
            row.append("-" if ratio is None else f"{ratio:.2f}"
                       + ("~" if base in r.get("ratios_noisy", ()) else ""))
        ratio_rows.append(row)
    ratios = table(["bytes", *[f"{b}/{base}" for b, base in pairs]], ratio_rows)
    return f"{main}\n\nGB/s ratios (kvbridge backend / baseline, same run):\n{ratios}"


def stage_table(report: Report) -> str:
    """Where each pull's time went, stage by stage (``runner.STAGES``), for
    the series with checksums on (the default config)."""
    names = [n for n, _, _ in STAGES]
    rows = []
    for r in report.results:
        st = r.get("stages_us")
        if not st or r["backend"] not in report.plan.with_checksums:
            continue
        rows.append([r["backend"], fmt_bytes(r["bytes"]), f"{r['latency_us']:.0f}",
                     *[f"{st[n]:.0f}" if n in st else "-" for n in names],
                     f"{st['producer']:.0f}" if "producer" in st else "-"])
    if not rows:
        return ""
    return ("where a pull's time goes, us (median of each stage over the timed pulls; "
            "stages in order, producer = its own share of 'grant'):\n"
            + table(["series", "bytes", "total", *names, "producer"], rows))


def checksum_cost_lines(report: Report) -> list[str]:
    """One line per backend: throughput with checksums over without, per size."""
    return [f"checksum cost, {b}: GB/s with / without checksums: "
            + ", ".join(f"{fmt_bytes(n)} {ratio:.2f}x" for n, ratio in pairs)
            for b, pairs in report.checksum_cost.items()]


def noise_line(report: Report) -> str:
    """Which measurements are too noisy to judge, and what the spread means."""
    noisy = report.noisy
    what = (f"~ = too noisy to judge: the middle half of the samples spread over more "
            f"than {NOISY_SPREAD:.0%} of the median (a ratio: on either side)")
    if not noisy:
        return f"spread: every measurement within {NOISY_SPREAD:.0%} ({what[4:]})."
    cells = ", ".join(f"{r['backend']} {fmt_bytes(r['bytes'])}"
                      + (f" ({r['spread']:.0%})" if r.get("spread") is not None else
                         f" ({r.get('reps', 0)} samples)") for r in noisy)
    advice = (" - rerun without --quick, on a quiet machine" if report.plan.quick else
              f" even after repeating for {report.plan.timing.settle_time:.0f} s - a busy "
              "machine?")
    return f"{what}: {cells}{advice}."


def footer(report: Report) -> list[str]:
    """What the cells mean, how each series moved its bytes, the run's conditions."""
    plan = report.plan
    shape_notes = ", ".join(
        f"{s} = [{h}, {bs}, {2 * hs}] ({fmt_bytes(layer_block_bytes(s))})"
        for s, (h, bs, hs) in report.block_shapes.items())
    lines = [
        f"cells: GB/s (latency in us), median of >= {plan.timing.min_reps} repetitions after a "
        "warm-up (noisy ones repeated longer, see below); bytes = blocks x 2 layers x layer-block.",
        f"block: layer-block [kv_heads, block_size, 2*head_size] bf16: {shape_notes}.",
        f"kvbridge backends ({', '.join(plan.backends) or 'none'}): producer process -> "
        f"consumer process over {plan.peers.link}, random non-contiguous block ids on both "
        "sides, a "
        "fresh request id per pull; latency = pull() to DONE, the consumer's checksum "
        f"verification included (series {NO_CHECKSUM}: checksums off); the producer "
        "digests blocks when it publishes, outside the timed pull.",
        *checksum_cost_lines(report),
        noise_line(report),
    ]
    if plan.baselines:
        lines.append("baselines move one contiguous buffer of the same bytes: memcpy = "
                     "one-core memmove, repeated on the same buffers (hot in cache up to a "
                     "few MiB); socket = request + sendall/recv_into between two processes; "
                     "nixl-raw = make_prepped_xfer READ + poll, two NIXL agents (UCX).")
    lines += plan.notes
    lines.append(f"total time {report.elapsed_s:.1f} s; 1-min load average "
                 f"{report.loadavg_start:.2f} at the start, {report.loadavg_end:.2f} at the "
                 f"end; UCX_NET_DEVICES={os.environ.get('UCX_NET_DEVICES')}")
    return lines


def payload(report: Report, png: Path | None) -> dict:
    """The results JSON (``write_results`` adds command, machine and time)."""
    plan = report.plan
    return {
        "backends": plan.backends,
        "series": plan.kv_series,
        "checksum_cost": checksum_cost_lines(report),
        "baselines": plan.baselines,
        "layers": NUM_LAYERS,
        "block_shapes": {s: {"kv_heads": h, "block_size": bs, "head_size": hs,
                             "layer_block_bytes": layer_block_bytes(s)}
                         for s, (h, bs, hs) in report.block_shapes.items()},
        "min_reps": plan.timing.min_reps,
        "elapsed_s": report.elapsed_s,
        "loadavg_start": report.loadavg_start,
        "loadavg_end": report.loadavg_end,
        "plot": png.name if png else None,
        "results": report.results,
    }


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

