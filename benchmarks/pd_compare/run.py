#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Side-by-side serving benchmark: colocated vLLM vs P/D with vLLM's
NixlConnector vs P/D with KVBridgeConnector (one run per transport).

Every configuration is started fresh on 127.0.0.1, loaded with vLLM's own
serving client (the ``vllm bench serve`` code path: ``vllm.benchmarks.serve``'s
argument parser and ``main_async``), then stopped by pid. See README.md next to
this file for the method; results go to ``benchmarks/results/<out-name>.{json,
md,png}``. This file is the entry point; the work is in the modules next to
it: ``plan`` (configurations, workloads), ``servers`` (start, health-wait,
stop through ``kvbridge.serve.launch``), ``load`` (vLLM's client, one
configuration's run), ``metrics`` (/metrics and log probes), ``report``
(the figures as data) and ``render`` (tables, markdown, plot).

    python benchmarks/pd_compare/run.py --quick
    python benchmarks/pd_compare/run.py --transports auto,tcp,nixl
    python benchmarks/pd_compare/run.py --quick --kv-shape llama8b --out-name pd_compare-llama8b
"""


from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# The modules next to this file are imported as ``benchmarks.pd_compare.*``;
# their bare names (plan, load, report...) must not shadow other modules.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The client runs in this process: keep vLLM's own log lines off stdout (the
# table goes there). Servers get VLLM_CONFIGURE_LOGGING=1 back explicitly.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

from benchmarks.pd_compare.load import run_config, vllm_serve_module  # noqa: E402
from benchmarks.pd_compare.plan import (  # noqa: E402
    SERVER_ARGS,
    SERVER_ENV,
    full_plan,
    make_configs,
    nixl_mode,
)
from benchmarks.pd_compare.render import build_report, markdown_tail, plot  # noqa: E402
from benchmarks.pd_compare.servers import log  # noqa: E402
from kvbridge.bench.common import Progress, results_dir, write_results  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small request counts and one "
                   "kvbridge transport (the first of --transports, default auto)")
    p.add_argument("--transports", default=None,
                   help="kvbridge transports, comma-separated (default auto,tcp,nixl - "
                        "auto is cma on one host; with --quick: auto)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per workload-1 "
                   "prompt length (default 10, --quick 4); workload 2 scales with it")
    p.add_argument("--out-name", default=None, help="results file stem (default pd_compare, "
                   "--quick: pd_compare-quick)")
    p.add_argument("--configs",
                   default="colocated,vllm-nixl,vllm-nixl-push,kvbridge,kvbridge-stream",
                   help="which of colocated, vllm-nixl (NixlConnector, pull), vllm-nixl-push "
                        "(NixlPushConnector), kvbridge (pull), kvbridge-stream (KV streamed "
                        "while prefill runs, first transport) to run")
    p.add_argument("--stream-chunk-tokens", type=int, default=512,
                   help="kvbridge-stream: the prefill instance's --max-num-batched-tokens, "
                        "so it computes (and publishes) a long prompt in chunks [512]")
    p.add_argument("--nixl-progress-thread", choices=["delay", "stock", "off"],
                   default="delay",
                   help="NIXL agents of vLLM's NixlConnector: 'delay' (default: NIXL's "
                        "progress thread with --nixl-pthr-delay-us between polls), 'stock' "
                        "(as vLLM creates them: the thread busy-polls a core per instance), "
                        "'off' (no progress thread; transfers stall); see README")
    p.add_argument("--nixl-pthr-delay-us", type=int, default=100,
                   help="poll delay of NIXL's progress thread with --nixl-progress-thread "
                        "delay [100]")
    p.add_argument("--colocated-cores", default="0-1",
                   help="VLLM_CPU_OMP_THREADS_BIND of the colocated instance (default 0-1: "
                        "the same two cores the P/D pair gets)")
    p.add_argument("--prefill-core", type=int, default=0)
    p.add_argument("--decode-core", type=int, default=1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--kvbridge-extra", type=json.loads, default=None, metavar="JSON",
                   help="more kv_connector_extra_config for both KVBridgeConnector servers, "
                        "e.g. '{\"step_yield_ms\": 0}'")
    p.add_argument("--kv-shape", choices=["llama8b"], default=None,
                   help="serve the tiny model with a real model's KV-cache shape (llama8b: "
                        "Llama-3-8B's 128 KiB per token, 256 MiB for a 2k prompt) instead of "
                        "its own 2 KiB per token")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", default=None, help="server, router and client logs "
                   "(default /tmp/kvbridge-pd-compare-<pid>)")
    p.add_argument("--report-from", metavar="JSON", help="start nothing: re-render the "
                   "tables, markdown and plot from an earlier run's results JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = make_configs(args)
    out_name = args.out_name or ("pd_compare-quick" if args.quick else "pd_compare")
    plan = full_plan(args)
    log_dir = Path(args.log_dir or f"/tmp/kvbridge-pd-compare-{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/pd_compare/run.py" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv) if (
            sys.argv[1:] if argv is None else argv) else "")

    from kvbridge.demo import tiny_model

    model = str(tiny_model.ensure(tiny_model.default_path(kv_shape=args.kv_shape),
                                  kv_shape=args.kv_shape))
    plan["kv_shape"] = args.kv_shape
    plan["kv_bytes_per_token"] = tiny_model.kv_bytes_per_token(kv_shape=args.kv_shape)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    log(f"pd_compare: {len(configs)} configurations {[c.key for c in configs]}, model {model}, "
        f"logs in {log_dir}")
    log("loading vLLM's serving client (vllm.benchmarks.serve) ...")
    vllm_serve_module()

    if args.report_from:
        old = json.loads(Path(args.report_from).read_text())
        text, summary, _ = build_report(old["results"], old["plan"])
        print(text)
        payload = {k: v for k, v in old.items() if k not in ("machine", "when")}
        payload["run_when"] = old.get("run_when") or old.get("when")
        payload["summary"] = summary
        out = write_results(out_name, payload, text)
        plot(old["results"], old["plan"], results_dir() / f"{out_name}.png")
        md = out.with_suffix(".md")
        md.write_text(md.read_text() + markdown_tail(old["results"], summary, old["plan"],
                                                     out_name, old.get("log_dir")))
        return 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    prog = Progress(total=len(configs) * 4)
    results: list[dict] = []
    rc = 0
    try:
        for i, cfg in enumerate(configs, 1):
            log(f"== {i}/{len(configs)} {cfg.label}")
            results.append(run_config(cfg, model, args, plan, log_dir, prog, vocab))
    except KeyboardInterrupt:
        log("interrupted; every process started was stopped")
        rc = 130
    finally:
        signal.signal(signal.SIGTERM, old)
    if not results:
        return rc or 1
    text, summary, _notes = build_report(results, plan)
    print(text)
    payload = {"command": command, "plan": plan, "configs": [c.__dict__ for c in configs],
               "cores": {"prefill": args.prefill_core, "decode": args.decode_core,
                         "colocated": args.colocated_cores},
               "server_env": SERVER_ENV, "server_args": SERVER_ARGS,
               "nixl_agents": nixl_mode(args),
               "summary": summary, "results": results, "log_dir": str(log_dir)}
    out = write_results(out_name, payload, text)
    png = results_dir() / f"{out_name}.png"
    try:
        plot(results, plan, png)
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {e}")
    md = out.with_suffix(".md")
    md.write_text(md.read_text() + markdown_tail(results, summary, plan, out_name, log_dir))
    log(f"results: {out}, {md}, {png}")
    if any(r.get("error") or r.get("leftovers") for r in results):
        rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
