# SPDX-License-Identifier: Apache-2.0
"""What pd_compare runs: the configurations, the workload plan, the servers'
common environment and arguments, and the command line."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

#: Environment of every server in every configuration (same for all, so the
#: comparison is fair): UCX over loopback for both NIXL users, and vLLM's stat
#: logger every second so "KV Transfer metrics" lines can be attributed to
#: one workload.
UCX_ENV = {"UCX_TLS": "self,sm,tcp", "UCX_NET_DEVICES": "lo"}
SERVER_ENV = {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOG_STATS_INTERVAL": "1", **UCX_ENV}
#: Prefix caching off everywhere: vLLM's random dataset builds prompts from
#: consecutive token ids, so prompts of two runs share prefixes with the same
#: seed; a cache hit would skip prefill (or transfer) in some configs only.
SERVER_ARGS = ["--no-enable-prefix-caching"]
SEED = 1234
#: sitecustomize that tunes the NIXL agents of vLLM's NixlConnector (see there).
NIXL_TUNING_DIR = Path(__file__).resolve().parent / "nixl_tuning"


@dataclass
class Config:
    key: str        # colocated | vllm-nixl | kvbridge-<transport>
    label: str
    kind: str       # colocated | nixl | kvbridge
    transport: str | None = None
    #: kvbridge: "pull" or "stream" (``kvbridge proxy --kv-mode``)
    kv_mode: str = "pull"



def nixl_tuning_env(args) -> dict:
    """Environment for the NixlConnector servers: stock NIXL, or our
    sitecustomize with a poll delay for (or without) NIXL's progress thread."""
    if args.nixl_progress_thread == "stock":
        return {}
    env = {"PYTHONPATH": os.pathsep.join(
        p for p in (str(NIXL_TUNING_DIR), os.environ.get("PYTHONPATH")) if p)}
    env["PD_COMPARE_NIXL_KEEP_AFFINITY"] = "1"
    if args.nixl_progress_thread == "off":
        env["PD_COMPARE_NIXL_PROG_THREAD"] = "0"
    else:
        env["PD_COMPARE_NIXL_PTHR_DELAY_US"] = str(args.nixl_pthr_delay_us)
    return env


def nixl_mode(args) -> str:
    return {"stock": "stock: busy-polling NIXL progress thread, vLLM's affinity change",
            "off": "no NIXL progress thread, affinity kept",
            "delay": f"NIXL progress thread polling every {args.nixl_pthr_delay_us} us, "
                     "affinity kept"}[args.nixl_progress_thread]



def make_plan(args) -> dict:
    n = args.num_prompts or (4 if args.quick else 10)
    return {
        "w1_lengths": [1024, 2048], "w1_out": 16, "w1_n": n, "w1_conc": 1,
        "side_n": 2 if args.quick else 3,
        # Streams should outlast the long-prompt window (1 s + (long_n - 1) / rate
        # + the last long request): 4 x max(4, 0.6 n) streams of 160-192 tokens
        # at >= 6 ms per token do; 'overlap' in the results says how well.
        "w2_streams": 4 * max(4, math.ceil(0.6 * n)), "w2_conc": 4, "w2_stream_in": 128,
        "w2_stream_out": 160 if args.quick else 192,
        "w2_long_n": max(3, n // 2), "w2_long_in": 2048, "w2_long_out": 8,
        "w2_long_rate": 0.5, "w2_long_delay": 1.0,
    }


def transports_of(args) -> list[str]:
    """The kvbridge transports to run (``--quick``: the first only)."""
    # auto (the default) is cma between two servers of one host: not run twice.
    transports = [t.strip() for t in (args.transports or ("auto" if args.quick else
                                                           "auto,tcp,nixl")).split(",")
                  if t.strip()]
    return transports[:1] if args.quick else transports


def make_configs(args) -> list[Config]:
    """The configurations ``--configs`` asks for, in run order."""
    wanted = {c.strip() for c in args.configs.split(",")}
    configs = []
    if "colocated" in wanted:
        configs.append(Config("colocated", "colocated (1 vLLM instance, no connector)",
                              "colocated"))
    if "vllm-nixl" in wanted:
        configs.append(Config("vllm-nixl", f"P/D, vLLM NixlConnector ({nixl_mode(args)}) "
                              "+ kvbridge proxy", "nixl"))
    if "vllm-nixl-push" in wanted:
        configs.append(Config("vllm-nixl-push", f"P/D, vLLM NixlPushConnector ({nixl_mode(args)})"
                              " + kvbridge proxy --kv-mode stream (decode registers at once, "
                              "prefill writes)", "nixl", kv_mode="stream"))
    if "kvbridge" in wanted:
        configs += [Config(f"kvbridge-{t}", f"P/D, KVBridgeConnector ({t}) + kvbridge proxy",
                           "kvbridge", t) for t in transports_of(args)]
    if "kvbridge-stream" in wanted:
        t = transports_of(args)[0]
        configs.append(Config(f"kvbridge-stream-{t}", f"P/D, KVBridgeConnector ({t}), KV "
                              f"streamed while prefill runs (prefill chunks of "
                              f"{args.stream_chunk_tokens} tokens) + kvbridge proxy "
                              "--kv-mode stream", "kvbridge", t, kv_mode="stream"))
    return configs


def full_plan(args) -> dict:
    """``make_plan`` plus the cores and NIXL agent mode, as results record them."""
    plan = make_plan(args)
    plan["colocated_cores"] = args.colocated_cores
    plan["nixl_agents"] = nixl_mode(args)
    plan["prefill_core"], plan["decode_core"] = args.prefill_core, args.decode_core
    return plan
