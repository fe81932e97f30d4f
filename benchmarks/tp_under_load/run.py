# SPDX-License-Identifier: Apache-2.0
"""Two TP=2 engines on a machine with fewer cores than busy processes: how
long the decode's answer takes, and how long a bystander process waits for
the CPU, with and without the connector's idle-step wait (``idle_wait_ms``).

Why: vLLM keeps stepping an engine while a request waits on the connector
(the producer's finished request until the consumer reads it, the
consumer's request until its KV lands). Each empty step is a round trip
between the engine core and its workers, which wait for each other by
spinning; measured on a 2-core machine, that spin starved the very consumer
the producer waited for - the answer took up to 34 s, the machine's other
processes got no CPU for over a minute. ``kvbridge.vllm.config`` explains
the wait that replaces it.

Each setting starts a fresh pair of ``kv_both`` TP=2 servers (prefix caching
off) with ``--hogs`` busy processes beside them, then sends each prompt
prefill -> decode in both directions for ``--rounds`` rounds; every answer is
compared with the colocated one. A heartbeat process (sleep 50 ms, note the
gap) measures the longest time anything else on the machine waited to run.

    python benchmarks/tp_under_load/run.py [--rounds 3] [--hogs 2] [--transport cma]

Results: ``benchmarks/results/tp-under-load.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from kvbridge.bench.common import table, write_results
from kvbridge.demo import tiny_model
from kvbridge.serve.launch import (
    free_port,
    free_port_block,
    kv_transfer_config,
    start_server,
    stop_all,
    wait_healthy,
)

PROMPTS = {
    "short": "The socket module provides access to the BSD socket interface.",
    "long": ("Return a new list containing all items from the iterable in ascending order; "
             "a custom key function can be supplied to customise the sort order. ") * 5,
}
MAX_TOKENS = 12
HOG = "while True: pass"
HEARTBEAT = """
import sys, time
path, worst, last = sys.argv[1], 0.0, time.monotonic()
while True:
    time.sleep(0.05)
    now = time.monotonic()
    if now - last > worst:
        worst = now - last
        open(path, "w").write(str(worst))
    last = now
"""


def complete(url: str, prompt: str, max_tokens: int, params: dict | None = None) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if params is not None:
        body["kv_transfer_params"] = params
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def run_setting(model: Path, log_dir: Path, transport: str, idle_wait_ms: float,
                rounds: int, hogs: int) -> dict:
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "OMP_WAIT_POLICY": "PASSIVE"}
    servers = [start_server(f"tp2{n}-idle{idle_wait_ms:g}", str(model), free_port(), block_size=32,
                            log_dir=log_dir, served_name="tiny", env=env,
                            extra_args=["--no-enable-prefix-caching",
                                        "--tensor-parallel-size", "2"],
                            kv_config=kv_transfer_config(
                                "kv_both", transport=transport, kv_port=free_port_block(2),
                                extra={"idle_wait_ms": idle_wait_ms}))
               for n in "ab"]
    helpers: list[subprocess.Popen] = []
    gap_file = log_dir / f"gap-{idle_wait_ms:g}"
    try:
        wait_healthy(servers, timeout_s=600)
        for s in servers:  # first forward pass: kernels, all-reduce set-up
            complete(s.url, PROMPTS["short"], 2)
        reference = {n: complete(servers[0].url, p, MAX_TOKENS)["choices"][0]["text"]
                     for n, p in PROMPTS.items()}
        helpers = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
        helpers.append(subprocess.Popen([sys.executable, "-c", HEARTBEAT, str(gap_file)]))
        took, wrong, failed = [], 0, []
        for r in range(rounds):
            prefill, decode = servers if r % 2 == 0 else servers[::-1]
            for name, prompt in PROMPTS.items():
                t0 = time.monotonic()
                outcome = "ok"
                try:
                    p = complete(prefill.url, prompt, 1, {"do_remote_decode": True})
                    d = complete(decode.url, prompt, MAX_TOKENS, p["kv_transfer_params"])
                    if d["choices"][0]["text"] != reference[name]:
                        wrong, outcome = wrong + 1, "WRONG TEXT"
                except httpx.HTTPStatusError as e:  # e.g. the lease expired first
                    outcome = f"HTTP {e.response.status_code}"
                    failed.append(f"round {r} {name}: {outcome} after "
                                  f"{time.monotonic() - t0:.1f} s")
                took.append(time.monotonic() - t0)
                print(f"  idle_wait_ms={idle_wait_ms:g} round {r} {name}: {took[-1]:.2f} s "
                      f"{outcome}", file=sys.stderr, flush=True)
        worst_gap = float(gap_file.read_text()) if gap_file.exists() else 0.0
    finally:
        for h in helpers:
            h.send_signal(signal.SIGKILL)
            h.wait()
        stop_all(servers)
    return {"idle_wait_ms": idle_wait_ms, "exchanges": len(took), "wrong": wrong,
            "failed": len(failed), "failures": failed,
            "p50_s": statistics.median(took), "max_s": max(took), "seconds": took,
            "worst_bystander_wait_s": worst_gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=2, help="busy processes beside the engines")
    ap.add_argument("--transport", default="cma", choices=["tcp", "cma", "nixl"])
    ap.add_argument("--idle-wait-ms", default="0,20",
                    help="settings to compare; the first is the baseline [0,20]")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    model = tiny_model.ensure(tiny_model.default_path())
    settings = [float(x) for x in args.idle_wait_ms.split(",")]
    with tempfile.TemporaryDirectory(prefix="kvbridge-tp-load-") as tmp:
        results = [run_setting(model, Path(tmp), args.transport, w, args.rounds, args.hogs)
                   for w in settings]
    base = results[0]
    rows = [[f"{r['idle_wait_ms']:g}", r["exchanges"], r["failed"], r["wrong"],
             f"{r['p50_s']:.2f}",
             f"{r['max_s']:.2f}", f"{base['p50_s'] / r['p50_s']:.1f}x",
             f"{r['worst_bystander_wait_s']:.2f}"] for r in results]
    table_text = table(["idle_wait_ms", "exchanges", "failed", "wrong", "p50 s", "max s",
                        "p50 speed-up vs first", "longest bystander wait s"], rows)
    failures = [f"idle_wait_ms={r['idle_wait_ms']:g}: {f}" for r in results
                for f in r["failures"]]
    text = "\n".join([f"two TP=2 kv_both engines ({args.transport}) + {args.hogs} busy "
                      f"processes on {os.cpu_count()} CPUs; seconds per exchange (prefill "
                      "answer + decode answer)", table_text, *failures])
    print(text)
    write_results("tp-under-load", {"transport": args.transport, "hogs": args.hogs,
                                    "rounds": args.rounds, "results": results}, text)

if __name__ == "__main__":
    main()
