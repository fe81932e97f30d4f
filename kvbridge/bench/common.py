# SPDX-License-Identifier: Apache-2.0
"""Shared helpers for benchmarks: timing, tables, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def results_dir() -> Path:
    """``benchmarks/results`` of the source tree (or ``KVBRIDGE_RESULTS_DIR``)."""
    env = os.environ.get("KVBRIDGE_RESULTS_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    return root / "benchmarks" / "results"


def time_it(fn: Callable[[], object], *, min_time: float = 0.2, min_reps: int = 3,
            max_reps: int = 200) -> float:
    """Median seconds of one call, after one warm-up call."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < min_time
                                      and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def command_line() -> str:
    """The command that produced a result: ``kvbridge …`` for the CLI,
    ``python -m module …`` or ``python script.py …``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if prog == "kvbridge":
        head = "kvbridge"
    elif spec is not None and spec.name:  # python -m package.module
        head = f"python -m {spec.name}"
    else:
        head = f"python {sys.argv[0]}" if sys.argv else "python"
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def write_results(name: str, payload: dict, table_text: str, json_path: str | None = None) -> Path:
    """Write ``<results>/<name>.json`` and ``.md`` (plus ``json_path`` if given)."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command_line(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    text = json.dumps(payload, indent=2) + "\n"
    (out / f"{name}.json").write_text(text)
    (out / f"{name}.md").write_text(
        f"# {name}\n\nProduced by `{payload['command']}` on {payload['when']} "
        f"({payload['machine']['cpus']} CPUs, {payload['machine']['platform']}).\n\n"
        f"```\n{table_text}\n```\n")
    if json_path:
        Path(json_path).write_text(text)
    return out / f"{name}.json"


class Progress:
    """One-line progress on stderr: ``[3/12] label``."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            end = "\n" if self.done == self.total or not sys.stderr.isatty() else "\r"
            print(f"[{self.done}/{self.total}] {label}\x1b[K" if sys.stderr.isatty()
                  else f"[{self.done}/{self.total}] {label}", end=end, file=sys.stderr, flush=True)
