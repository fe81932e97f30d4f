# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench chaos``: a real prefill/decode pair behind ``kvbridge
proxy`` under load while faults are injected on a schedule.

What runs: a prefill (KVBridgeConnector ``kv_producer``) and a decode
(``kv_consumer``) vLLM server with the tiny model, each pinned to a core,
short kvbridge timeouts, and ``kvbridge proxy`` in front with the decode pool
``[decode0, decode-mismatch]`` (the second is not started until its fault).
A colocated reference server (no connector) answers the probe prompts once,
alone, and is stopped before the load starts (at most three vLLM servers at
any time).

The load: ``--requests`` requests (mixed prompt lengths, some streamed, some
chat) from ``--concurrency`` client threads, every one with a deadline. Faults
fire when a given share of the requests has been sent, so requests are in
flight when they hit; while a fault recovers (a restart takes 30 s or more)
requests trickle, one every few seconds and at most a tenth of the load per
fault, instead of using up the budget. Schedule:

1. at 15 %: prefill0 SIGKILLed, restarted on its port;
2. at 35 %: prefill0 SIGSTOPped for longer than the transfer timeout, resumed;
3. at 50 %: decode0 SIGKILLed and restarted - with ``fault_flip_byte_every``
   (the consumer flips a byte of every Nth landed pull before checking it)
   when this kvbridge knows the key: the flipped-byte fault runs from here on;
4. at 70 %: decode-mismatch (block size 64) starts on a port the proxy
   already lists, so it joins the decode pool; the proxy must keep it out of
   rotation while it serves the rest of the load. It runs the other
   ``kv_load_failure_policy`` than decode0 (``--policy``, default
   ``recompute``), so each run meets a failed KV load under both policies.

A load request may or may not be mid-transfer when a fault hits, so faults 1,
2 and 4 also get a few *aimed* requests: the benchmark plays the router (prefill
step on the producer, the fault, then the decode step with the producer's
``kv_transfer_params``), so every run has pulls from a dead producer, from a
stopped one, and into a decode with another layout (kvbridge proxy never
pairs those; a router without its layout pre-check would).

Correctness is checked where it can be: vLLM's CPU kernels are not
batch-invariant, so answers are compared with the colocated reference only
for the probe prompts, sent one at a time while nothing else runs - before
the load, after each fault has recovered (the load is paused and drained
first), and after the load. Load requests count as answered correctly when
well-formed with exactly the requested number of tokens.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from kvbridge.bench import chaos_report
from kvbridge.bench.chaos_faults import FLIP_KEY, Faults
from kvbridge.bench.chaos_load import Load, Normalizer, load_requests, probe_requests, send
from kvbridge.bench.chaos_stack import Stack, scrape
from kvbridge.serve.launch import free_port, start_server

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CI size: 200 requests at "
                   "concurrency 16 (default 1000 at 32)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--requests", type=int, metavar="N", help="requests in the load")
    p.add_argument("--concurrency", type=int, metavar="N", help="client threads")
    p.add_argument("--transport", default="tcp", choices=["tcp", "cma", "nixl"])
    p.add_argument("--policy", default="recompute", choices=["recompute", "fail"],
                   help="vLLM kv_load_failure_policy of decode0 (the decode instance the "
                   "proxy routes to); the mismatched decode gets the other one, so every run "
                   "meets a failed KV load under both")
    p.add_argument("--deadline", type=float, default=60.0, metavar="S",
                   help="a request with no complete answer in S seconds is hung")
    p.add_argument("--flip-every", type=int, default=None, metavar="N",
                   help=f"{FLIP_KEY} for the restarted decode (default: the number of "
                   "probe prompts, so each probe round lands on one flipped pull)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", help="server, proxy and request logs (default: a temp dir)")
    p.add_argument("--fuzz", action="store_true", help="run the protocol fuzzer "
                   "(kvbridge.bench.fuzz) instead of the chaos run")
    p.add_argument("--inputs", type=int, metavar="N", help="--fuzz: inputs per target")
    p.add_argument("--transports", metavar="LIST", help="--fuzz: comma-separated transports")


def make_plan(args: argparse.Namespace) -> dict:
    quick = bool(args.quick)
    ncpu = os.cpu_count() or 1
    probes = 4 if quick else 8
    kv = {"transfer_timeout_s": 3.0, "handshake_timeout_s": 2.0, "lease_s": 20.0}
    return {
        "quick": quick,
        "requests": args.requests or (200 if quick else 1000),
        "concurrency": args.concurrency or (16 if quick else 32),
        "transport": args.transport,
        "policy": args.policy,
        "policies": {"decode0": args.policy,
                     "decode-mismatch": "fail" if args.policy == "recompute" else "recompute"},
        "deadline_s": args.deadline,
        "probes": probes,
        "flip_every": args.flip_every or probes,
        "kvbridge_extra_config": kv,
        "sigstop_s": kv["transfer_timeout_s"] + 4.0,
        "recovery_send_interval_s": 2.0 if quick else 1.0,
        "aimed_per_fault": 3 if quick else 6,
        "settle_timeout_s": kv["lease_s"] + 15.0,
        "recovery_max_requests": max(1, (args.requests or (200 if quick else 1000)) // 10),
        "schedule": [[0.15, "kill_prefill"], [0.35, "sigstop_prefill"],
                     [0.50, "kill_decode"], [0.70, "mismatched_decode_joins"]],
        "seed": args.seed,
        # prefill and decode on a core each, as kvbridge up pins them
        "cores": {"prefill0": 0, "decode0": 1 % ncpu, "decode-mismatch": 1 % ncpu,
                  "reference": 1 % ncpu},
    }


def run(args: argparse.Namespace) -> int:
    if getattr(args, "fuzz", False):
        return run_fuzz(args)
    from kvbridge.demo import tiny_model

    plan = make_plan(args)
    model = str(tiny_model.ensure(tiny_model.default_path()))
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="kvbridge-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    load_start = list(os.getloadavg())

    def clock() -> float:
        return time.monotonic() - t0

    stack = Stack(model, log_dir, transport=plan["transport"], policy=plan["policy"],
                  extra=plan["kvbridge_extra_config"], clock=clock)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_sigterm)
    data = None
    rc = 0
    chaos = Chaos(plan, stack, log_dir, clock)
    try:
        data = chaos.run()
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr, flush=True)
        rc = 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        print(f"\nkvbridge bench chaos failed: {type(e).__name__}: {e}", file=sys.stderr)
        print("\n".join(stack.events[-20:]), file=sys.stderr)
        rc = 1
    finally:
        chaos.abort()
        left = stack.stop()
        signal.signal(signal.SIGTERM, old)
        if left:
            print(f"WARNING: still running after stop: {left}", file=sys.stderr)
            rc = rc or 1
    if data is not None:
        data["duration_s"] = round(clock(), 1)
        data["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
        data["processes_left_running"] = left
        text = chaos_report.render(data)
        print(text)
        chaos_report.write(data, text, args.json)
    return rc


def run_fuzz(args: argparse.Namespace) -> int:
    from kvbridge.bench import fuzz

    return fuzz.run(args)


class Chaos(Faults):
    def __init__(self, plan: dict, stack: Stack, log_dir: Path, clock):
        self.plan, self.stack, self.log_dir, self.clock = plan, stack, log_dir, clock
        self.faults: list[dict] = []
        self.probe_rounds: list[dict] = []
        self.reference: list[str] = []
        self.flip = {"every": plan["flip_every"],
                     "active_on": None, "note": None}
        self.load: Load | None = None
        self.aimed: list[dict] = []
        self.aimed_threads: list = []
        #: faults and crashed engines being restarted right now
        self._recovering = 0
        self._recovering_lock = threading.Lock()
        stack.on_restart_begin, stack.on_restart_end = self.begin_recovery, self.end_recovery

    def begin_recovery(self) -> None:
        """While something recovers, requests trickle (see ``Load.trickle``)."""
        with self._recovering_lock:
            self._recovering += 1
            if self.load is not None:
                self.load.trickle(self.plan["recovery_send_interval_s"],
                                  self.plan["recovery_max_requests"])

    def end_recovery(self) -> None:
        with self._recovering_lock:
            self._recovering -= 1
            if self._recovering == 0 and self.load is not None:
                self.load.trickle(None)

    def abort(self) -> None:
        """No more load requests (an error or Ctrl-C ends the run early)."""
        if self.load is not None:
            self.load.stop()

    def say(self, msg: str) -> None:
        line = f"[{self.clock():6.1f} s] {msg}"
        self.stack.events.append(line)
        print(line, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        plan, stack = self.plan, self.stack
        from kvbridge.demo import tiny_model

        corpus = self.corpus = tiny_model.corpus_text()
        cores = plan["cores"]
        self.prefill = stack.add("prefill0", "kv_producer", cores["prefill0"])
        self.decode = stack.add("decode0", "kv_consumer", cores["decode0"])
        self.mismatch = stack.add("decode-mismatch", "kv_consumer", cores["decode-mismatch"],
                                  block_size=64, policy=plan["policies"]["decode-mismatch"])
        self.mismatch.restart_on_crash = False  # out of rotation anyway: not worth 30 s
        probes = probe_requests(plan["probes"], corpus)
        reqs = load_requests(plan["requests"], plan["seed"], corpus)

        self.say("starting prefill0, decode0 and the colocated reference")
        ref = start_server("reference", stack.model, free_port(), cpu_core=cores["reference"],
                           log_dir=self.log_dir, served_name="tiny")
        stack.others.append(ref)
        stack.start(self.prefill)
        stack.start(self.decode)
        for inst in (self.prefill, self.decode):
            stack.wait_up(inst)
        from kvbridge.serve.launch import wait_healthy

        wait_healthy([ref])
        self.say("servers up; reference answers (one prompt at a time)")
        with httpx.Client() as c:
            for p in probes:
                r = send(c, ref.url, p, 120.0, Normalizer({}))
                if r.get("outcome") != "ok":
                    raise RuntimeError(f"colocated reference failed on {p.id}: {r}")
                self.reference.append(r["text"])
        ref.stop()
        self.say("reference stopped")

        url = stack.start_proxy([self.prefill.url], [self.decode.url, self.mismatch.url])
        names = {self.prefill.url: "prefill0", self.decode.url: "decode0",
                 self.mismatch.url: "decode-mismatch", url: "proxy"}
        self.norm = Normalizer(names)
        start = scrape(self.prefill.url) or {}
        self.kv_usage_start = start.get("kv_usage")
        stack.start_monitor()
        self.probe_round("before the load", probes)

        self.load = Load(url, reqs, plan["concurrency"], plan["deadline_s"], self.norm,
                         self.clock)
        self.say(f"load: {len(reqs)} requests at concurrency {plan['concurrency']}")
        t_load = self.clock()
        self.load.start()
        for frac, fault in plan["schedule"]:
            at = int(frac * len(reqs))
            while self.load.sent < at and not self.load.finished():
                time.sleep(0.05)
            if self.load.finished():
                self.faults.append({"fault": fault, "fired": False,
                                    "note": "the load ended first"})
                continue
            self.wait_instances_up(120.0)
            getattr(self, fault)()
            self.probe_round(f"after {fault}", probes)
        self.load.join(timeout=plan["requests"] * plan["deadline_s"])
        for t in self.aimed_threads:
            t.join(plan["deadline_s"] + 15)
        load_s = self.clock() - t_load
        self.say(f"load done in {load_s:.0f} s")
        self.probe_round("after the load", probes)
        leaked = self.settle()
        stack.auto_restart = False
        for inst in stack.instances.values():
            stack.check(inst)
        stack.stop_monitor()
        for _, inc in stack.incarnations():
            stack.scan_log(inc)
        stack.explain_crashes()
        return chaos_report.collect(self, load_s, leaked)

    def wait_instances_up(self, timeout_s: float) -> None:
        """A crashed engine being restarted is not a target for the next fault."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(i.current is None or i.current.state in ("up", "killed", "failed_start")
                   or (i.current.state == "crashed" and not i.restart_on_crash)
                   for i in self.stack.instances.values()):
                return
            time.sleep(0.5)

    # ------------------------------------------------------------------ probes
    def probe_round(self, name: str, probes) -> None:
        self.wait_instances_up(180.0)  # a crashed engine's restart is not what probes check
        waited = self.load.pause() if self.load is not None else 0.0
        n = len(self.probe_rounds)
        results = []
        with httpx.Client() as c:
            for p, want in zip(probes, self.reference):
                r = send(c, self.stack.proxy_url, p, self.plan["deadline_s"], self.norm,
                         wire_id=f"prb-{n}-{p.probe}")
                if r.get("outcome") == "ok" and r.get("text") != want:
                    r.update(outcome="wrong", detail="differs from the colocated reference")
                r.update(phase=name, t_send=round(self.clock(), 2))
                results.append(r)
        if self.load is not None:
            self.load.resume()
        ok = sum(r["outcome"] == "ok" for r in results)
        self.probe_rounds.append({"round": name, "t_s": round(self.clock(), 1),
                                  "drain_s": round(waited, 1), "results": results})
        self.say(f"probe round '{name}': {ok}/{len(results)} identical to the reference "
                 f"(modes {[r.get('mode') for r in results]})")

    # ------------------------------------------------------------------ leaks
    def settle(self) -> dict:
        """Wait for the producer's KV cache usage to return to its start value."""
        t0 = time.monotonic()
        limit = self.plan["settle_timeout_s"]
        m = None
        while time.monotonic() - t0 < limit:
            m = scrape(self.prefill.url)
            if m and m["kv_usage"] is not None and m["kv_usage"] <= (self.kv_usage_start or 0):
                break
            time.sleep(0.5)
        usage = m["kv_usage"] if m else None
        blocks = (round(usage * m["num_blocks"]) if m and usage is not None and m["num_blocks"]
                  else None)
        d = scrape(self.decode.url) or {}
        out = {"prefill_kv_usage_start": self.kv_usage_start, "prefill_kv_usage_end": usage,
               "prefill_blocks_held": blocks, "prefill_num_blocks": m and m["num_blocks"],
               "settle_s": round(time.monotonic() - t0, 1), "settle_limit_s": limit,
               "decode_kv_usage_end": d.get("kv_usage")}
        self.say(f"settled: producer KV usage {usage} (start {self.kv_usage_start}) after "
                 f"{out['settle_s']} s")
        return out


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))


__all__ = ["add_arguments", "run", "make_plan"]
