# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench transport``'s entry point: plan, measure, report, render, write."""

from __future__ import annotations

import argparse
import os
import sys
import time

from kvbridge.bench.common import Progress, results_dir, write_results
from kvbridge.bench.transport import render
from kvbridge.bench.transport.plan import PlanError, build_plan
from kvbridge.bench.transport.report import build_report
from kvbridge.bench.transport.runner import measure


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every transfer completed and verified."""
    if getattr(args, "listen", None):
        from kvbridge.bench.transport.peers import serve

        return serve(args.listen)
    try:
        plan = build_plan(args)
    except PlanError as e:
        print(e, file=sys.stderr)
        return 2
    for note in plan.skipped:
        print(f"skipping {note}", file=sys.stderr)
    if not plan.cases:
        print("nothing to measure", file=sys.stderr)
        return 2

    startups = len(plan.runs) + sum(b != "memcpy" for b in plan.baselines)
    prog = Progress(startups + len(plan.series) * len(plan.cases))
    started = time.perf_counter()
    # Other work on the machine skews every number; keep the load next to them.
    load_start = os.getloadavg()[0]
    results = measure(plan, prog)
    elapsed = time.perf_counter() - started
    report = build_report(plan, results, elapsed, load_start, os.getloadavg()[0])

    text = render.tables(report)
    footer = render.footer(report)
    print(text)
    print("\n" + "\n".join(footer))

    name = "transport" + ("-remote" if plan.connect else "") + ("-quick" if plan.quick else "")
    png = render.plot(results, plan.series, results_dir() / f"{name}.png",
                      f"kvbridge bench transport{' --quick' if plan.quick else ''}: producer "
                      f"-> consumer over {plan.peers.link} ({os.cpu_count()} CPUs)")
    out = write_results(name, render.payload(report, png), text + "\n\n" + "\n".join(footer),
                        getattr(args, "json", None))
    print(f"\nwrote {out}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0 if report.ok else 1
