# SPDX-License-Identifier: Apache-2.0
"""The load pd_compare puts on one configuration: vLLM's own serving client
(``vllm.benchmarks.serve``) for the workloads, a few side requests through the
router for its X-KVBridge-* headers, and ``run_config`` tying one
configuration's start, warm-up, workloads, probes and stop together."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shlex
import time
from pathlib import Path

from benchmarks.pd_compare.metrics import Probe
from benchmarks.pd_compare.plan import SEED, Config
from benchmarks.pd_compare.servers import (
    Stack,
    affinity,
    log,
    start_proxy,
    start_stack,
    wait_servers,
)
from kvbridge.bench.common import Progress

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
                 "transport": cfg.transport, "kv_mode": cfg.kv_mode}
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

