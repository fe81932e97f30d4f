#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Side-by-side serving benchmark: colocated vLLM vs P/D with vLLM's
NixlConnector vs P/D with KVBridgeConnector (one run per transport).

Every configuration is started fresh on 127.0.0.1, loaded with vLLM's own
serving client (the ``vllm bench serve`` code path: ``vllm.benchmarks.serve``'s
argument parser and ``main_async``), then stopped by pid. See README.md next to
this file for the method; results go to ``benchmarks/results/<out-name>.{json,
md,png}``.

    python benchmarks/pd_compare/run.py --quick
    python benchmarks/pd_compare/run.py --transports tcp,cma,nixl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The client runs in this process: keep vLLM's own log lines off stdout (the
# table goes there). Servers get VLLM_CONFIGURE_LOGGING=1 back explicitly.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

from kvbridge.bench.common import Progress, results_dir, table, write_results  # noqa: E402
from kvbridge.serve.launch import (  # noqa: E402
    VllmServer,
    free_port,
    kv_transfer_config,
    start_server,
    stop_all,
    stop_group,
    wait_http_healthy,
)

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
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- configs
@dataclass
class Config:
    key: str        # colocated | vllm-nixl | kvbridge-<transport>
    label: str
    kind: str       # colocated | nixl | kvbridge
    transport: str | None = None


@dataclass
class Stack:
    cfg: Config
    servers: list[VllmServer] = field(default_factory=list)
    proxy: subprocess.Popen | None = None
    proxy_url: str | None = None
    proxy_log: Path | None = None

    @property
    def endpoint(self) -> str:
        return self.proxy_url or self.servers[0].url

    def server(self, name: str) -> VllmServer | None:
        return next((s for s in self.servers if s.name.startswith(name)), None)

    def stop(self) -> None:
        stop_group(self.proxy)
        stop_all(self.servers)

    def leftovers(self) -> list[str]:
        left = [s.name for s in self.servers if s.alive()]
        if self.proxy is not None and self.proxy.poll() is None:
            left.append("proxy")
        return left


def start_stack(cfg: Config, model: str, args, log_dir: Path) -> Stack:
    st = Stack(cfg)
    common = dict(block_size=args.block_size, served_name="tiny", log_dir=log_dir,
                  extra_args=SERVER_ARGS, max_model_len=4096)
    if cfg.kind == "colocated":
        st.servers.append(start_server(
            f"{cfg.key}", model, free_port(),
            env={**SERVER_ENV, "VLLM_CPU_OMP_THREADS_BIND": args.colocated_cores}, **common))
    else:
        for role, core, name in (("kv_producer", args.prefill_core, "prefill"),
                                 ("kv_consumer", args.decode_core, "decode")):
            env = {**SERVER_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(core)}
            if cfg.kind == "nixl":
                kv = {"kv_connector": "NixlConnector", "kv_role": role,
                      "kv_buffer_device": "cpu"}
                env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
                env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
                env.update(nixl_tuning_env(args))
            else:
                kv = kv_transfer_config(role, transport=cfg.transport, kv_port=free_port())
            st.servers.append(start_server(f"{name}-{cfg.key}", model, free_port(),
                                           kv_config=kv, env=env, **common))
    return st


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


def wait_servers(st: Stack, timeout_s: float) -> None:
    t0 = time.monotonic()
    pending = list(st.servers)
    next_beat = 10.0
    while pending:
        for s in list(pending):
            if not s.alive():
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode} during start-up; "
                                   f"last log lines ({s.log_path}):\n{s.log_tail()}")
            if s.healthy():
                pending.remove(s)
                log(f"  {s.name} healthy after {time.monotonic() - t0:.0f} s ({s.url})")
        el = time.monotonic() - t0
        if pending and el > timeout_s:
            raise TimeoutError(f"{[s.name for s in pending]} not healthy after {timeout_s:.0f} s")
        if pending and el >= next_beat:
            log(f"  waiting for {', '.join(s.name for s in pending)} ({el:.0f} s)")
            next_beat += 10.0
        if pending:
            time.sleep(0.5)


def start_proxy(st: Stack, log_dir: Path) -> None:

    port = free_port()
    exe = Path(sys.executable).parent / "kvbridge"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
           ["-m", "kvbridge.cli"]), "proxy", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    for s in st.servers:
        cmd += ["--prefill" if s.name.startswith("prefill") else "--decode", s.url]
    st.proxy_log = log_dir / f"proxy-{st.cfg.key}-{port}.log"
    with open(st.proxy_log, "wb") as f:
        st.proxy = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, stdin=subprocess.DEVNULL)
    st.proxy_url = f"http://127.0.0.1:{port}"
    wait_http_healthy(st.proxy, st.proxy_url, 90, st.proxy_log)


def affinity(server: VllmServer) -> dict[str, dict[str, int]]:
    """Per process of the server's group: thread count by allowed-CPU list, and
    which list the busiest thread has (where the compute actually ran)."""
    out: dict[str, dict] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != server.proc.pid:  # pgrp
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            lists: dict[str, int] = {}
            busiest, busy_t = None, -1
            for t in (p / "task").iterdir():
                st = (t / "status").read_text()
                m = re.search(r"Cpus_allowed_list:\s*(\S+)", st)
                cl = m.group(1) if m else "?"
                lists[cl] = lists.get(cl, 0) + 1
                ts = (t / "stat").read_text()
                tf = ts[ts.rindex(")") + 2:].split()
                cpu_t = int(tf[11]) + int(tf[12])
                if cpu_t > busy_t:
                    busiest, busy_t = cl, cpu_t
            out[f"{comm}[{p.name}]"] = {"threads_by_cpus": lists, "busiest_thread_cpus": busiest}
        except (OSError, ValueError, IndexError):
            continue
    return out


# ----------------------------------------------------------------------------- metrics
def scrape(url: str) -> dict[tuple[str, str | None], float]:
    """Prometheus text -> {(name, le): value}, summed over all other labels."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[tuple[str, str | None], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        m = re.search(r'le="([^"]+)"', labels)
        key = (name, m.group(1) if m else None)
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def hist_mean(d: dict, name: str) -> float | None:
    n = d.get((name + "_count", None), 0.0)
    return d.get((name + "_sum", None), 0.0) / n if n > 0 else None


def hist_count(d: dict, name: str) -> float:
    return d.get((name + "_count", None), 0.0)


def hist_quantile(d: dict, name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile (linear inside the bucket)."""
    buckets = sorted((float(le), c) for (n, le), c in d.items() if n == name + "_bucket")
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


_XFER_RE = re.compile(r"KV Transfer metrics: (.*)$")


def transfer_log_stats(text: str) -> dict | None:
    """Weighted mean transfer time from vLLM's "KV Transfer metrics" log lines
    (KVBridge: "Avg transfer time (ms)", NixlConnector: "Avg xfer time (ms)")."""
    n_tot, ms_tot, mb_tot, failed = 0, 0.0, 0.0, 0
    for line in text.splitlines():
        m = _XFER_RE.search(line)
        if not m:
            continue
        kv = dict(p.split("=", 1) for p in m.group(1).split(", ") if "=" in p)
        try:
            n = int(float(kv.get("Num successful transfers", 0)))
            avg = float(kv.get("Avg transfer time (ms)", kv.get("Avg xfer time (ms)", 0)))
            failed += int(float(kv.get("Num failed transfers", 0) or 0))
            if "Bytes transferred (MB)" in kv:      # KVBridge: total MB (1e6)
                mb_tot += float(kv["Bytes transferred (MB)"])
            elif "Avg MB per transfer" in kv:       # NIXL: MiB per transfer
                mb_tot += float(kv["Avg MB per transfer"]) * n * 2**20 / 1e6
        except ValueError:
            continue
        n_tot += n
        ms_tot += avg * n
    if n_tot == 0 and failed == 0:
        return None
    return {"transfers": n_tot, "mean_ms": ms_tot / n_tot if n_tot else None,
            "mean_MB": mb_tot / n_tot if n_tot else None, "failed": failed}


class Probe:
    """Before/after snapshot of every /metrics endpoint and the decode log."""

    def __init__(self, st: Stack):
        self.st = st
        dec = st.server("decode")
        self.dec_log = dec.log_path if dec else None
        self.before = self._snap()
        self.log_off = self.dec_log.stat().st_size if self.dec_log else 0

    def _snap(self) -> dict:
        snap = {s.name.split("-")[0]: scrape(s.url) for s in self.st.servers}
        if self.st.proxy_url:
            snap["proxy"] = scrape(self.st.proxy_url)
        return snap

    def finish(self, settle_s: float = 1.6) -> dict:
        if self.dec_log:
            time.sleep(settle_s)  # one stat-logger interval (VLLM_LOG_STATS_INTERVAL=1)
        after = self._snap()
        d = {k: delta(after[k], self.before.get(k, {})) for k in after}
        out: dict = {}
        if "proxy" in d:
            p = d["proxy"]
            out["proxy"] = {
                "overhead_p50_ms": _ms(hist_quantile(p, "kvbridge_proxy_overhead_seconds", .5)),
                "overhead_p99_ms": _ms(hist_quantile(p, "kvbridge_proxy_overhead_seconds", .99)),
                "overhead_mean_ms": _ms(hist_mean(p, "kvbridge_proxy_overhead_seconds")),
                "prefill_mean_ms": _ms(hist_mean(p, "kvbridge_proxy_prefill_seconds")),
                "ttft_mean_ms": _ms(hist_mean(p, "kvbridge_proxy_ttft_seconds")),
                "requests": hist_count(p, "kvbridge_proxy_overhead_seconds"),
                "failures": sum(v for (n, _), v in p.items()
                                if n.startswith("kvbridge_proxy_failures")),
                "fallbacks": sum(v for (n, _), v in p.items()
                                 if n.startswith("kvbridge_proxy_fallback_requests")),
            }
        for role in ("colocated", "prefill", "decode"):
            if role not in d:
                continue
            v = d[role]
            out[role] = {
                "queue_mean_ms": _ms(hist_mean(v, "vllm:request_queue_time_seconds")),
                "prefill_mean_ms": _ms(hist_mean(v, "vllm:request_prefill_time_seconds")),
                "ttft_mean_ms": _ms(hist_mean(v, "vllm:time_to_first_token_seconds")),
                "itl_mean_ms": _ms(hist_mean(v, "vllm:inter_token_latency_seconds")),
            }
            if role == "decode" and hist_count(v, "vllm:nixl_xfer_time_seconds"):
                out["nixl_prom"] = {
                    "transfers": hist_count(v, "vllm:nixl_xfer_time_seconds"),
                    "mean_ms": _ms(hist_mean(v, "vllm:nixl_xfer_time_seconds")),
                    "mean_bytes": hist_mean(v, "vllm:nixl_bytes_transferred"),
                }
        if self.dec_log:
            with open(self.dec_log, "rb") as f:
                f.seek(self.log_off)
                out["transfer_log"] = transfer_log_stats(f.read().decode(errors="replace"))
        return out


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


# ----------------------------------------------------------------------------- client
_VS = None


def vllm_serve_module():
    """``vllm.benchmarks.serve`` (what ``vllm bench serve`` runs), patched in one
    place: prompt re-alignment asks a real vLLM server's /tokenize (the router
    has none), the same way for every configuration."""
    global _VS
    if _VS is None:
        from vllm.benchmarks import serve as vs

        orig = vs._align_prompts_to_server_tokenizer

        async def align(base_url, model_id, reqs, ssl_context=None):
            return await orig(_TOKENIZE_URL[0] or base_url, model_id, reqs, ssl_context)

        vs._align_prompts_to_server_tokenizer = align
        _VS = vs
    return _VS


_TOKENIZE_URL: list[str | None] = [None]


def client_argv(base_url: str, model: str, *, input_len: int, output_len: int, n: int,
                seed: int, result_dir: Path, result_name: str,
                max_concurrency: int | None = None, request_rate: float | None = None,
                burstiness: float = 1.0) -> list[str]:
    argv = ["--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", "tiny", "--tokenizer", model, "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", "0.0", "--num-prompts", str(n), "--seed", str(seed),
            "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--disable-tqdm", "--ready-check-timeout-sec", "0", "--save-result",
            # Distinct per invocation: concurrent clients parsed by one parser would
            # otherwise share vLLM's random default prefix, i.e. send duplicate
            # X-Request-Ids ("<prefix>0", "<prefix>1", ...).
            "--request-id-prefix", f"{Path(result_name).stem}-",
            "--save-detailed", "--result-dir", str(result_dir),
            "--result-filename", result_name]
    if max_concurrency is not None:
        argv += ["--max-concurrency", str(max_concurrency)]
    if request_rate is not None:
        argv += ["--request-rate", str(request_rate), "--burstiness", str(burstiness)]
    return argv


def run_clients(argvs: list[tuple[list[str], float]], out_log: Path) -> list[dict]:
    """Run one or more ``vllm bench serve`` invocations concurrently (each after
    its delay); their own printout goes to ``out_log``."""
    vs = vllm_serve_module()
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vs.add_cli_args(parser)
    namespaces = [(parser.parse_args(a), d) for a, d in argvs]

    async def one(ns, delay):
        if delay:
            await asyncio.sleep(delay)
        return await vs.main_async(ns)

    async def all_():
        return await asyncio.gather(*(one(ns, d) for ns, d in namespaces))

    with open(out_log, "a") as f, contextlib.redirect_stdout(f):
        for ns, _ in namespaces:
            print("$ vllm bench serve " + shlex.join(_argv_of(ns, argvs)))
        return asyncio.run(all_())


def _argv_of(ns, argvs) -> list[str]:
    for a, _ in argvs:
        if a[a.index("--result-filename") + 1] == ns.result_filename:
            return a
    return []


def summarize(r: dict) -> dict:
    keys = ("completed", "failed", "duration", "request_throughput", "output_throughput",
            "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_ttft_ms",
            "p50_itl_ms", "p90_itl_ms", "p99_itl_ms", "mean_itl_ms", "p50_tpot_ms",
            "p99_tpot_ms", "p50_e2el_ms", "p99_e2el_ms", "total_input_tokens",
            "total_output_tokens")
    out = {k: _num(r.get(k)) for k in keys if k in r}
    errs = [e for e in r.get("errors") or [] if e]
    if errs:
        out["errors"] = sorted(set(e.strip()[-400:] for e in errs))[:5]
    return out


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ----------------------------------------------------------------------------- side requests
def token_prompt(n: int, seed: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(16, vocab) for _ in range(n)]


def side_requests(st: Stack, lengths: list[int], per_len: int, vocab: int) -> list[dict]:
    """A few non-streaming requests through the router, reading its X-KVBridge-*
    headers (the vLLM client cannot see them)."""
    import httpx

    out = []
    with httpx.Client(timeout=300) as c:
        for L in lengths:
            for i in range(per_len):
                body = {"model": "tiny", "prompt": token_prompt(L, SEED + 100 * L + i, vocab),
                        "max_tokens": 2, "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = c.post(st.endpoint + "/v1/completions", json=body)
                el = (time.perf_counter() - t0) * 1e3
                h = r.headers
                out.append({"prompt_tokens": L, "status": r.status_code, "latency_ms": el,
                            "transfer_ms": _num(h.get("x-kvbridge-transfer-ms")),
                            "kv_bytes": _num(h.get("x-kvbridge-kv-bytes")),
                            "prefill_ms": _num(h.get("x-kvbridge-prefill-ms")),
                            "mode": h.get("x-kvbridge-mode"),
                            "error": None if r.status_code == 200 else r.text[:400]})
    return out


def warmup(st: Stack, vocab: int) -> None:
    import httpx

    with httpx.Client(timeout=300) as c:
        for i, L in enumerate((512, 1024)):
            r = c.post(st.endpoint + "/v1/completions",
                       json={"model": "tiny", "prompt": token_prompt(L, 7 + i, vocab),
                             "max_tokens": 4, "temperature": 0, "ignore_eos": True})
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request failed: HTTP {r.status_code}: {r.text[:500]}")


# ----------------------------------------------------------------------------- one config
def run_config(cfg: Config, model: str, args, plan: dict, log_dir: Path, prog: Progress,
               vocab: int) -> dict:
    res: dict = {"config": cfg.key, "label": cfg.label, "kind": cfg.kind,
                 "transport": cfg.transport}
    res["loadavg_before"] = os.getloadavg()
    st = start_stack(cfg, model, args, log_dir)
    try:
        log(f"{cfg.label}: starting {', '.join(s.name for s in st.servers)} "
            f"(logs in {log_dir})")
        t0 = time.monotonic()
        wait_servers(st, args.startup_timeout)
        if cfg.kind != "colocated":
            start_proxy(st, log_dir)
        res["startup_s"] = time.monotonic() - t0
        _TOKENIZE_URL[0] = st.servers[-1].url
        prog.step(f"{cfg.key}: up after {res['startup_s']:.0f} s; warming up")
        warmup(st, vocab)
        res["affinity"] = {s.name: affinity(s) for s in st.servers}
        cdir = log_dir / "client"
        cdir.mkdir(exist_ok=True)
        clog = log_dir / f"client-{cfg.key}.log"
        w: dict = {}
        # -- workload 1: ~1k and ~2k-token prompts, short outputs ------------
        for L in plan["w1_lengths"]:
            name = f"w1_{L}"
            pr = Probe(st)
            argv = client_argv(st.endpoint, model, input_len=L, output_len=plan["w1_out"],
                               n=plan["w1_n"], seed=SEED + L, result_dir=cdir,
                               result_name=f"{cfg.key}-{name}.json",
                               max_concurrency=plan["w1_conc"])
            t1 = time.monotonic()
            (r,) = run_clients([(argv, 0.0)], clog)
            w[name] = {"client": summarize(r), "server": pr.finish(),
                       "wall_s": time.monotonic() - t1}
            c = w[name]["client"]
            prog.step(f"{cfg.key}: {L}-token prompts: TTFT p50 {c.get('p50_ttft_ms', 0):.0f} ms, "
                      f"failed {c.get('failed', 0):.0f}")
        # -- side measurement: transfer figures through the router ------------
        if cfg.kind != "colocated":
            pr = Probe(st)
            side = side_requests(st, plan["w1_lengths"], plan["side_n"], vocab)
            res["side"] = {"requests": side, "server": pr.finish()}
        # -- workload 2: steady decode streams + periodic long prompts --------
        pr = Probe(st)
        streams = client_argv(st.endpoint, model, input_len=plan["w2_stream_in"],
                              output_len=plan["w2_stream_out"], n=plan["w2_streams"],
                              seed=SEED + 7, result_dir=cdir,
                              result_name=f"{cfg.key}-w2_streams.json",
                              max_concurrency=plan["w2_conc"])
        longs = client_argv(st.endpoint, model, input_len=plan["w2_long_in"],
                            output_len=plan["w2_long_out"], n=plan["w2_long_n"],
                            seed=SEED + 8, result_dir=cdir,
                            result_name=f"{cfg.key}-w2_long.json",
                            request_rate=plan["w2_long_rate"], burstiness=100.0)
        t1 = time.monotonic()
        rs, rl = run_clients([(streams, 0.0), (longs, plan["w2_long_delay"])], clog)
        wall = time.monotonic() - t1
        w["w2"] = {"streams": summarize(rs), "long": summarize(rl), "server": pr.finish(),
                   "wall_s": wall, **mixed_window(rs, rl),
                   "request_throughput": (rs.get("completed", 0) + rl.get("completed", 0))
                   / max(wall, 1e-9)}
        s = w["w2"]["streams"]
        prog.step(f"{cfg.key}: mixed: stream ITL p99 {s.get('p99_itl_ms', 0):.0f} ms "
                  f"(during long prompts {w['w2'].get('window_p99_itl_ms') or 0:.0f} ms), "
                  f"long TTFT p50 {w['w2']['long'].get('p50_ttft_ms', 0):.0f} ms")
        res["workloads"] = w
    except Exception as e:  # noqa: BLE001 - record, clean up, go on with the next config
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"{cfg.label}: FAILED: {res['error']}")
        for s in st.servers:
            res.setdefault("log_tails", {})[s.name] = s.log_tail(30)
    finally:
        res["loadavg_after"] = os.getloadavg()
        log(f"{cfg.label}: stopping")
        st.stop()
        left = st.leftovers()
        if left:
            log(f"WARNING: still running after stop: {left}")
            res["leftovers"] = left
    return res


def mixed_window(rs: dict, rl: dict) -> dict:
    """Decode-stream ITLs inside the long-prompt window (first long request sent
    to last one answered), and the share of stream tokens emitted while a long
    prompt was in flight (did the mix actually mix?)."""
    spans = [(s, s + lat) for s, lat, ttft in zip(rl.get("start_times") or [],
                                                  rl.get("latencies") or [],
                                                  rl.get("ttfts") or []) if ttft]
    if not spans:
        return {}
    w0, w1 = min(a for a, _ in spans), max(b for _, b in spans)
    tot = hit = 0
    win: list[float] = []
    for s, ttft, itl in zip(rs.get("start_times") or [], rs.get("ttfts") or [],
                            rs.get("itls") or []):
        if not ttft:
            continue
        t = s + ttft
        tot += 1
        hit += any(a <= t <= b for a, b in spans)
        for d in itl:
            t += d
            tot += 1
            hit += any(a <= t <= b for a, b in spans)
            if w0 <= t <= w1:
                win.append(d * 1e3)
    return {"overlap": hit / tot if tot else None, "window_s": w1 - w0,
            "window_itl_n": len(win), "window_p50_itl_ms": pct(win, 50),
            "window_p99_itl_ms": pct(win, 99)}


# ----------------------------------------------------------------------------- report
def fmt(v, spec="{:.1f}") -> str:
    return "-" if v is None else spec.format(v)


def ratio(a, b) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def get(d: dict, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def xfer_ms(res: dict, wl: str) -> tuple[float | None, str]:
    """KV transfer ms/request for a workload: decode-log stats under load, else
    NIXL's Prometheus histogram, else the side measurement's headers."""
    w = get(res, "workloads", wl, "server") or {}
    tl = w.get("transfer_log")
    if tl and tl.get("mean_ms") is not None:
        return tl["mean_ms"], "log"
    if get(w, "nixl_prom", "mean_ms") is not None:
        return w["nixl_prom"]["mean_ms"], "prom"
    return None, ""


def build_report(results: list[dict], plan: dict) -> tuple[str, dict, str]:
    by = {r["config"]: r for r in results}
    col, nix = by.get("colocated"), by.get("vllm-nixl")
    sections, summary, notes = [], {}, []
    heads = ["config", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "req/s", "KV xfer ms/req",
             "TTFT p50 /coloc", "TTFT p50 /NIXL", "ITL p99 /coloc", "ITL p99 /NIXL", "failed"]

    def row(r, c, wl):
        ref_c = get(col, "workloads", *wl) if col else None
        ref_n = get(nix, "workloads", *wl) if nix else None
        xf, _ = xfer_ms(r, wl[0])
        rps = get(r, "workloads", wl[0], "request_throughput") if wl[0] == "w2" else \
            c.get("request_throughput")
        return [r["config"], fmt(c.get("p50_ttft_ms")), fmt(c.get("p99_ttft_ms")),
                fmt(c.get("p50_itl_ms"), "{:.2f}"), fmt(c.get("p99_itl_ms"), "{:.2f}"),
                fmt(rps, "{:.3f}"), fmt(xf, "{:.2f}") if r["kind"] != "colocated" else "n/a",
                fmt(ratio(c.get("p50_ttft_ms"), get(ref_c, "p50_ttft_ms")), "{:.3f}"),
                fmt(ratio(c.get("p50_ttft_ms"), get(ref_n, "p50_ttft_ms")), "{:.3f}"),
                fmt(ratio(c.get("p99_itl_ms"), get(ref_c, "p99_itl_ms")), "{:.3f}"),
                fmt(ratio(c.get("p99_itl_ms"), get(ref_n, "p99_itl_ms")), "{:.3f}"),
                fmt(c.get("failed"), "{:.0f}")]

    for L in plan["w1_lengths"]:
        rows = [row(r, get(r, "workloads", f"w1_{L}", "client") or {}, (f"w1_{L}", "client"))
                for r in results if get(r, "workloads", f"w1_{L}")]
        sections.append(f"Workload 1, ~{L}-token prompts, {plan['w1_out']} output tokens, "
                        f"max concurrency {plan['w1_conc']}, {plan['w1_n']} requests "
                        f"(ms; ITL over all tokens):\n" + table(heads, rows))
    for r in results:
        s = get(r, "workloads", "w2", "streams")
        if not s:
            continue
        ln = get(r, "workloads", "w2", "long") or {}
        # TTFT columns: the long prompts (the ones that get prefilled remotely);
        # ITL columns: the decode streams (the ones a long prefill can stall).
        w2 = r["workloads"]["w2"]
        w2["_mixed"] = {
            "p50_ttft_ms": ln.get("p50_ttft_ms"), "p99_ttft_ms": ln.get("p99_ttft_ms"),
            "p50_itl_ms": w2.get("window_p50_itl_ms"), "p99_itl_ms": w2.get("window_p99_itl_ms"),
            "failed": (s.get("failed") or 0) + (ln.get("failed") or 0)}
    rows = [row(r, r["workloads"]["w2"]["_mixed"], ("w2", "_mixed"))
            + [fmt(get(r, "workloads", "w2", "streams", "p50_itl_ms"), "{:.2f}"),
               fmt(get(r, "workloads", "w2", "streams", "p99_itl_ms"), "{:.2f}"),
               fmt(get(r, "workloads", "w2", "overlap"), "{:.2f}")]
            for r in results if get(r, "workloads", "w2", "_mixed")]
    sections.append(
        f"Workload 2, mixed: {plan['w2_streams']} decode streams ({plan['w2_stream_in']} in / "
        f"{plan['w2_stream_out']} out, max concurrency {plan['w2_conc']}) + {plan['w2_long_n']} "
        f"long prompts ({plan['w2_long_in']} in / {plan['w2_long_out']} out) at "
        f"{plan['w2_long_rate']} req/s from t={plan['w2_long_delay']} s. TTFT = the long "
        f"prompts; ITL = the decode streams' inter-token latency while long prompts were being "
        f"served (first long request sent .. last one answered), ratios on these; 'all-run' = "
        f"the client's ITL over the whole run; overlap = share of stream tokens emitted while "
        f"a long prompt was in flight:\n"
        + table(heads + ["ITL p50 all-run", "ITL p99 all-run", "overlap"], rows))

    # -- breakdown of TTFT (means, additive) ----------------------------------
    for r in results:
        for L in plan["w1_lengths"]:
            wl = get(r, "workloads", f"w1_{L}")
            if not wl:
                continue
            cm = get(wl, "client", "mean_ttft_ms")
            if r["kind"] == "colocated":
                srv = get(wl, "server", "colocated") or {}
                b = {"client_ttft": cm, "prefill": srv.get("prefill_mean_ms"),
                     "decode_queue": srv.get("queue_mean_ms")}
            else:
                px = get(wl, "server", "proxy") or {}
                xf, _src = xfer_ms(r, f"w1_{L}")
                ovh, pre, pt = (px.get("overhead_mean_ms"), px.get("prefill_mean_ms"),
                                px.get("ttft_mean_ms"))
                dec_first = pt - pre - ovh if None not in (pt, pre, ovh) else None
                b = {"client_ttft": cm, "proxy_overhead": ovh, "prefill": pre,
                     "kv_transfer": xf,
                     "decode_rest": dec_first - xf if None not in (dec_first, xf) else dec_first,
                     "decode_queue": get(wl, "server", "decode", "queue_mean_ms"),
                     "client_gap": cm - pt if None not in (cm, pt) else None,
                     "hop": cm - pre if None not in (cm, pre) else None}
            summary.setdefault(r["config"], {})[f"breakdown_{L}"] = b

    # -- headline figures ------------------------------------------------------
    lines = []
    pd = [r for r in results if r["kind"] != "colocated" and get(r, "workloads")]
    for L in plan["w1_lengths"]:
        c50 = get(col, "workloads", f"w1_{L}", "client", "p50_ttft_ms") if col else None
        n50 = get(nix, "workloads", f"w1_{L}", "client", "p50_ttft_ms") if nix else None
        nix_ovh = n50 - c50 if None not in (n50, c50) else None
        for r in pd:
            p50 = get(r, "workloads", f"w1_{L}", "client", "p50_ttft_ms")
            ovh = p50 - c50 if None not in (p50, c50) else None
            e = summary.setdefault(r["config"], {})
            e[f"ttft_overhead_ms_{L}"] = ovh
            e[f"ttft_ratio_to_colocated_{L}"] = ratio(p50, c50)
            if r["kind"] == "kvbridge":
                # Only meaningful when both P/D configs are slower than colocated;
                # otherwise the colocated baseline itself was slowed (noise).
                e[f"overhead_ratio_to_nixl_{L}"] = ratio(ovh, nix_ovh) if (
                    ovh is not None and nix_ovh is not None and ovh > 0 and nix_ovh > 0) \
                    else None
                hop = get(e, f"breakdown_{L}", "hop")
                nhop = get(summary, "vllm-nixl", f"breakdown_{L}", "hop")
                e[f"hop_ratio_to_nixl_{L}"] = ratio(hop, nhop) if (
                    hop is not None and nhop and hop > 0 and nhop > 0) else None
    lines.append("TTFT overhead of disaggregation = P/D TTFT p50 - colocated TTFT p50 (ms); "
                 "kvb/NIXL = kvbridge overhead / NIXL overhead (target <= 0.5); "
                 "P/D / coloc = TTFT p50 ratio (target <= 1.10 at ~2k); hop = mean TTFT minus "
                 "the mean prefill round trip (what disaggregation adds besides the prefill "
                 "itself, free of the colocated instance's different core count), hop kvb/NIXL "
                 "its ratio:")
    heads2 = ["config"]
    for L in plan["w1_lengths"]:
        heads2 += [f"overhead ~{L}", f"kvb/NIXL ~{L}", f"P/D / coloc ~{L}", f"hop ~{L}",
                   f"hop kvb/NIXL ~{L}"]
    heads2 += ["proxy ovh p50 ms", "ITL p99 mixed /coloc"]
    rows2 = []
    for r in pd:
        e = summary[r["config"]]
        row2 = [r["config"]]
        for L in plan["w1_lengths"]:
            row2 += [fmt(e.get(f"ttft_overhead_ms_{L}"), "{:+.1f}"),
                     fmt(e.get(f"overhead_ratio_to_nixl_{L}"), "{:.2f}")
                     if r["kind"] == "kvbridge" else "-",
                     fmt(e.get(f"ttft_ratio_to_colocated_{L}"), "{:.3f}"),
                     fmt(get(e, f"breakdown_{L}", "hop")),
                     fmt(e.get(f"hop_ratio_to_nixl_{L}"), "{:.2f}")
                     if r["kind"] == "kvbridge" else "-"]
        p50s = [get(r, "workloads", k, "server", "proxy", "overhead_p50_ms")
                for k in [f"w1_{L}" for L in plan["w1_lengths"]] + ["w2"]]
        p50s = [v for v in p50s if v is not None]
        e["proxy_overhead_p50_ms"] = statistics.median(p50s) if p50s else None
        e["itl_p99_mixed_ratio_to_colocated"] = ratio(
            get(r, "workloads", "w2", "_mixed", "p99_itl_ms"),
            get(col, "workloads", "w2", "_mixed", "p99_itl_ms") if col else None)
        row2 += [fmt(e["proxy_overhead_p50_ms"], "{:.3f}"),
                 fmt(e["itl_p99_mixed_ratio_to_colocated"], "{:.3f}")]
        rows2.append(row2)
    lines.append(table(heads2, rows2))

    # -- targets ---------------------------------------------------------------
    Lmax = max(plan["w1_lengths"])
    verdicts = []
    for r in pd:
        e = summary[r["config"]]
        if r["kind"] == "kvbridge":
            v = e.get(f"overhead_ratio_to_nixl_{Lmax}")
            verdicts.append((r["config"], f"kvbridge/NIXL TTFT overhead at ~{Lmax} <= 0.5"
                             + ("" if v is not None else " (n/a: overhead <= 0)"), v,
                             None if v is None else v <= 0.5))
        v = e.get(f"ttft_ratio_to_colocated_{Lmax}")
        verdicts.append((r["config"], f"P/D TTFT / colocated at ~{Lmax} <= 1.10", v,
                         None if v is None else v <= 1.10))
        v = e.get("proxy_overhead_p50_ms")
        verdicts.append((r["config"], "proxy overhead p50 < 1 ms", v,
                         None if v is None else v < 1.0))
    summary["targets"] = [{"config": c, "target": t, "value": v, "met": m}
                          for c, t, v, m in verdicts]
    lines.append("Targets:\n" + table(["config", "target", "value", "met"], [
        [c, t, fmt(v, "{:.3f}"), {True: "yes", False: "NO", None: "n/a"}[m]]
        for c, t, v, m in verdicts]))

    # -- where the time goes (means, additive) ---------------------------------
    rows3 = []
    for r in results:
        for L in plan["w1_lengths"]:
            b = summary.get(r["config"], {}).get(f"breakdown_{L}")
            if not b:
                continue
            rows3.append([r["config"], L, fmt(b["client_ttft"]), fmt(b.get("proxy_overhead"),
                                                                     "{:.3f}"),
                          fmt(b.get("prefill")), fmt(b.get("kv_transfer"), "{:.2f}"),
                          fmt(b.get("decode_rest")), fmt(b.get("decode_queue")),
                          fmt(b.get("client_gap")), fmt(b.get("hop"))])
    lines.append(
        "Where the TTFT goes (means over workload 1, ms). P/D: client TTFT = proxy overhead + "
        "prefill (round trip to the prefill instance, max_tokens=1, from the proxy's histogram) "
        "+ KV transfer + decode rest (decode instance after the transfer: scheduling, first "
        "decode step, first chunk through the proxy; 'of which queue' = "
        "vllm:request_queue_time there) + client gap (client TTFT - proxy TTFT); hop = client "
        "TTFT - prefill = everything disaggregation adds besides running the prefill. "
        "Colocated: prefill = vllm:request_prefill_time, queue = vllm:request_queue_time:\n"
        + table(["config", "prompt", "client TTFT", "proxy ovh", "prefill", "KV xfer",
                 "decode rest", "of which queue", "client gap", "hop"], rows3))

    # -- transfer-time cross-check ---------------------------------------------
    rows4 = []
    for r in pd:
        side = get(r, "side", "requests") or []
        for L in plan["w1_lengths"]:
            s = [q for q in side if q["prompt_tokens"] == L and q["status"] == 200]
            hdr = [q["transfer_ms"] for q in s if isinstance(q["transfer_ms"], float)]
            kvb = [q["kv_bytes"] for q in s if isinstance(q["kv_bytes"], float)]
            srv = get(r, "side", "server") or {}
            rows4.append([r["config"], L, len(s), fmt(statistics.median(hdr) if hdr else None,
                                                      "{:.2f}"),
                          fmt(statistics.median(kvb) / 2**20 if kvb else None, "{:.2f}"),
                          fmt(get(srv, "nixl_prom", "mean_ms"), "{:.2f}"),
                          fmt(get(srv, "transfer_log", "mean_ms"), "{:.2f}"),
                          fmt(xfer_ms(r, f"w1_{L}")[0], "{:.2f}")])
    lines.append(
        "KV transfer time cross-check (ms): side = a few non-streaming requests through the "
        "router after workload 1 (header = X-KVBridge-Transfer-Ms, KVBridge only; prom = "
        "vllm:nixl_xfer_time_seconds on the decode instance, NIXL only; log = vLLM's "
        "'KV Transfer metrics' lines of the decode instance); under load = the log figure "
        "during workload 1:\n" + table(["config", "prompt", "side n", "side header",
                                        "side KV MiB", "side prom", "side log", "under load"],
                                       rows4))

    # -- notes: failures, affinity ---------------------------------------------
    for r in results:
        if r.get("error"):
            notes.append(f"{r['config']}: FAILED: {r['error']}")
        for wl, w in (r.get("workloads") or {}).items():
            for part in ("client", "streams", "long"):
                errs = get(w, part, "errors")
                if errs:
                    notes.append(f"{r['config']} {wl} {part}: {len(errs)} distinct error(s): "
                                 + " | ".join(errs[:3]))
            px = get(w, "server", "proxy") or {}
            if px.get("failures") or px.get("fallbacks"):
                notes.append(f"{r['config']} {wl}: proxy failures {px['failures']:.0f}, "
                             f"colocated fallbacks {px['fallbacks']:.0f}")
        if r.get("loadavg_before"):
            notes.append(f"{r['config']}: load average (1 min) {r['loadavg_before'][0]:.1f} "
                         f"before, {r['loadavg_after'][0]:.1f} after (2 CPUs; >~3 means other "
                         "work competed with this configuration)")
        for srv, procs in (r.get("affinity") or {}).items():
            busy = {v["busiest_thread_cpus"] for v in procs.values()
                    if v.get("busiest_thread_cpus")}
            notes.append(f"{r['config']}: {srv}: busiest thread per process ran on CPUs "
                         f"{sorted(busy)}")
    text = "\n\n".join(sections + lines + (["Notes:\n" + "\n".join(notes)] if notes else []))
    return text, summary, "\n".join(notes)


def plot(results: list[dict], plan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [(f"w1_{L}", f"~{L}-token prompts") for L in plan["w1_lengths"]] + \
        [("w2", "mixed (TTFT: long prompts, ITL: streams)")]
    fig, axes = plt.subplots(len(wls), 2, figsize=(12, 3.6 * len(wls)), squeeze=False)
    names = [r["config"] for r in results if r.get("workloads")]
    for i, (wl, title) in enumerate(wls):
        for j, (metric, unit) in enumerate((("ttft", "TTFT"), ("itl", "ITL"))):
            ax = axes[i][j]
            vals = {}
            for q in ("p50", "p99"):
                vs = []
                for r in results:
                    if not r.get("workloads"):
                        continue
                    c = get(r, "workloads", wl, "client") if wl != "w2" else \
                        get(r, "workloads", "w2", "_mixed")
                    vs.append(get(c or {}, f"{q}_{metric}_ms") or 0.0)
                vals[q] = vs
            x = range(len(names))
            ax.bar([k - 0.2 for k in x], vals["p50"], 0.4, label="p50")
            ax.bar([k + 0.2 for k in x], vals["p99"], 0.4, label="p99")
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("ms")
            pos = [v for q in vals.values() for v in q if v > 0]
            if pos and max(pos) / min(pos) > 50:
                ax.set_yscale("log")
                ax.set_ylabel("ms (log)")
            ax.set_title(f"{unit} - {title}", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small request counts and one "
                   "kvbridge transport (the first of --transports, default tcp)")
    p.add_argument("--transports", default=None,
                   help="kvbridge transports, comma-separated (default tcp,cma,nixl; "
                        "with --quick: tcp)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per workload-1 "
                   "prompt length (default 10, --quick 4); workload 2 scales with it")
    p.add_argument("--out-name", default=None, help="results file stem (default pd_compare, "
                   "--quick: pd_compare-quick)")
    p.add_argument("--configs", default="colocated,vllm-nixl,kvbridge",
                   help="which of colocated, vllm-nixl, kvbridge to run")
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
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", default=None, help="server, router and client logs "
                   "(default /tmp/kvbridge-pd-compare-<pid>)")
    p.add_argument("--report-from", metavar="JSON", help="start nothing: re-render the "
                   "tables, markdown and plot from an earlier run's results JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    transports = [t.strip() for t in (args.transports or ("tcp" if args.quick else
                                                           "tcp,cma,nixl")).split(",")
                  if t.strip()]
    if args.quick:
        transports = transports[:1]
    wanted = {c.strip() for c in args.configs.split(",")}
    configs = []
    if "colocated" in wanted:
        configs.append(Config("colocated", "colocated (1 vLLM instance, no connector)",
                              "colocated"))
    if "vllm-nixl" in wanted:
        configs.append(Config("vllm-nixl", f"P/D, vLLM NixlConnector ({nixl_mode(args)}) "
                              "+ kvbridge proxy", "nixl"))
    if "kvbridge" in wanted:
        configs += [Config(f"kvbridge-{t}", f"P/D, KVBridgeConnector ({t}) + kvbridge proxy",
                           "kvbridge", t) for t in transports]
    out_name = args.out_name or ("pd_compare-quick" if args.quick else "pd_compare")
    plan = make_plan(args)
    plan["colocated_cores"] = args.colocated_cores
    plan["nixl_agents"] = nixl_mode(args)
    plan["prefill_core"], plan["decode_core"] = args.prefill_core, args.decode_core
    log_dir = Path(args.log_dir or f"/tmp/kvbridge-pd-compare-{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/pd_compare/run.py" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv) if (
            sys.argv[1:] if argv is None else argv) else "")

    from kvbridge.demo import tiny_model

    model = str(tiny_model.ensure(tiny_model.default_path()))
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


def ncores(spec: str) -> int:
    n = 0
    for part in str(spec).split(","):
        a, _, b = part.partition("-")
        n += (int(b) - int(a) + 1) if b else 1
    return n


def markdown_tail(results, summary, plan, out_name, log_dir) -> str:
    t = [f"\n![TTFT and ITL per configuration]({out_name}.png)\n",
         "\n## Method\n",
         "See `benchmarks/pd_compare/README.md`. Load: vLLM's serving client "
         "(`vllm.benchmarks.serve`, the `vllm bench serve` code path), random dataset, seed "
         f"{SEED}+, `--ignore-eos`, temperature 0. Plan: `{json.dumps(plan)}`. Server, router "
         f"and client logs were in `{log_dir}`. Cores: prefill {plan.get('prefill_core')}, "
         f"decode {plan.get('decode_core')}, colocated {plan.get('colocated_cores')}. vLLM "
         f"NixlConnector's NIXL agents: {plan.get('nixl_agents')} (see the README).\n",
         "\n## Reading the targets\n"]
    for tg in summary.get("targets", []):
        met = {True: "met", False: "**not met**", None: "not measured"}[tg["met"]]
        t.append(f"- {tg['config']}: {tg['target']}: {fmt(tg['value'], '{:.3f}')} ({met})\n")
    missed = [tg for tg in summary.get("targets", []) if tg["met"] is False]
    if missed:
        L = max(plan["w1_lengths"])
        col = get(summary, "colocated", f"breakdown_{L}") or {}
        t.append(f"\n## Where the time goes (~{L}-token prompts, means)\n\n")
        for r in results:
            if r["kind"] == "colocated":
                continue
            b = get(summary, r["config"], f"breakdown_{L}")
            if not b or b.get("client_ttft") is None:
                continue
            extra = (b["client_ttft"] - col["client_ttft"]) if col.get("client_ttft") else None
            pre_gap = (b["prefill"] - col["prefill"]) if None not in (
                b.get("prefill"), col.get("prefill")) else None
            t.append(
                f"- **{r['config']}**: TTFT {fmt(b['client_ttft'])} ms vs colocated "
                f"{fmt(col.get('client_ttft'))} ms ({fmt(extra, '{:+.1f}')} ms). Of the P/D "
                f"TTFT: prefill round trip {fmt(b.get('prefill'))} ms (colocated server prefill "
                f"{fmt(col.get('prefill'))} ms: {fmt(pre_gap, '{:+.1f}')} ms from the prefill "
                f"instance having one core where the colocated one has "
                f"{ncores(plan.get('colocated_cores', '0-1'))}"
                f", plus its own HTTP/tokenize/schedule/sample cycle), KV transfer "
                f"{fmt(b.get('kv_transfer'), '{:.2f}')} ms, decode instance after the "
                f"transfer {fmt(b.get('decode_rest'))} ms (of which queue "
                f"{fmt(b.get('decode_queue'))} ms), proxy overhead "
                f"{fmt(b.get('proxy_overhead'), '{:.3f}')} ms, client gap "
                f"{fmt(b.get('client_gap'))} ms.\n")
        t.append("\nEvery P/D request also runs a whole prefill request (HTTP, tokenization, "
                 "scheduling, one sampled token) before the decode request starts; on a tiny "
                 "model the per-hop costs weigh much more than on a real one. Both instances, "
                 "the router and the client share two cores, so results from a loaded machine "
                 "are noisy.\n")
    return "".join(t)


if __name__ == "__main__":
    sys.exit(main())
