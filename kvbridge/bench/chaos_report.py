# SPDX-License-Identifier: Apache-2.0
"""Counting and printing for ``kvbridge bench chaos`` (see ``chaos``)."""

from __future__ import annotations

import json
import re
import textwrap
from collections import Counter

from kvbridge.bench.common import table, write_results

_ID = re.compile(r"(chs-\d{5}|prb-\d+-\d+|aim-\d+-\d+)")
OUTCOMES = ("ok", "error", "fell_back", "wrong", "unclear", "hung")
#: The rows of the summary table, in order: (key, label).
ROWS = (("sent", "sent"), ("ok", "answered correctly"),
        ("error", "failed with a clear error"), ("fell_back", "fell back"),
        ("wrong", "wrong answers"), ("unclear", "failed without a clear error"),
        ("hung", "hung requests"), ("engine_crashes", "engine crashes"),
        ("leaked", "producer blocks still held after the run"))
GOALS = ("wrong", "hung", "engine_crashes", "leaked")


def failed_loads(stack, norm) -> dict[str, dict]:
    """Requests a consumer reported a failed KV load for, from its log
    (the request id the proxy forwards is part of vLLM's)."""
    out: dict[str, dict] = {}
    for inst, inc in stack.incarnations():
        if inst.kv_role != "kv_consumer":
            continue
        try:
            text = inc.server.log_path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if "KVBridgeConnector" not in line or "fail" not in line.lower():
                continue
            m = _ID.search(line)
            if m and m.group(1) not in out:
                reason = line.split("KVBridgeConnector", 1)[1].lstrip(": ")
                out[m.group(1)] = {"instance": inc.label, "reason": norm(reason)}
    return out


def _local_compute(stack) -> dict:
    tot = {"local_compute": 0, "external_kv_transfer": 0}
    for inst, inc in stack.incarnations():
        if inst.kv_role != "kv_consumer" or not inc.metrics_first or not inc.metrics_last:
            continue
        for k in tot:
            tot[k] += (inc.metrics_last["sources"].get(k, 0)
                       - inc.metrics_first["sources"].get(k, 0))
    return tot


def collect(chaos, load_s: float, leaked: dict) -> dict:
    plan, stack = chaos.plan, chaos.stack
    load = chaos.load
    loads = []
    for i, r in enumerate(load.results):
        if r is None:
            if i < load.sent:
                loads.append({"id": load.reqs[i].id, "index": i, "outcome": "hung",
                              "detail": "no answer when the run ended"})
            continue
        loads.append(r)
    probes = [r for rnd in chaos.probe_rounds for r in rnd["results"]]
    aimed = list(chaos.aimed)
    n_aimed = sum(f["aimed"]["prefilled"] for f in chaos.faults
                  if "decode_at" in f.get("aimed", {}))
    aimed += [{"id": "aim-?", "outcome": "hung", "detail": "no answer when the run ended"}
              for _ in range(n_aimed - len(aimed))]
    bad_loads = failed_loads(stack, chaos.norm)
    policies = plan["policies"]
    recompute = plan["policy"] == "recompute"
    for r in loads + probes + aimed:
        how = []
        if r.get("mode") == "fallback":
            how.append("proxy_colocated")
        if r["id"] in bad_loads:
            r["failed_load"] = bad_loads[r["id"]]
            where = bad_loads[r["id"]]["instance"].split("#")[0]
            if policies.get(where, plan["policy"]) == "recompute" \
                    and r["outcome"] in ("ok", "wrong"):
                how.append("decode_recomputed")
        elif (recompute and r.get("status") == 200 and not r.get("stream")
              and r.get("mode") == "disaggregated" and not r.get("transfer_ms")):
            how.append("no_kv_transfer_figure")
        r["fell_back"] = how

    def count(rs):
        c = Counter(r["outcome"] for r in rs)
        c["fell_back"] = sum(bool(r["fell_back"]) for r in rs)
        c["sent"] = len(rs)
        return c

    cl, cp, ca = count(loads), count(probes), count(aimed)
    crashes = list(stack.crashes)
    summary = {}
    for key, _ in ROWS[:7]:
        summary[key] = {"load": cl[key], "probes": cp[key], "aimed": ca[key],
                        "total": cl[key] + cp[key] + ca[key]}
    for f in chaos.faults:  # what each fault's aimed requests got
        if "decode_at" in f.get("aimed", {}):
            mine = [r for r in aimed if r.get("phase") == f["fault"]]
            f["aimed"]["outcomes"] = dict(Counter(r["outcome"] for r in mine))
            f["aimed"]["failed_loads_logged"] = sum("failed_load" in r for r in mine)
    summary["engine_crashes"] = {"total": len(crashes)}
    held = leaked.get("prefill_kv_usage_end")
    start = leaked.get("prefill_kv_usage_start") or 0.0
    summary["leaked"] = {"total": None if held is None else (leaked.get("prefill_blocks_held")
                                                            if held > start else 0),
                         "kv_usage": held, "kv_usage_start": start}
    everything = loads + probes + aimed
    errors = Counter(r["detail"] for r in everything if r["outcome"] == "error")
    problems = {k: Counter(r.get("detail") for r in everything if r["outcome"] == k)
                for k in ("wrong", "unclear", "hung")}
    fb = Counter(h for r in everything for h in r["fell_back"])
    fb_tokens = sum(r.get("prompt_tokens") or 0 for r in everything
                    if "proxy_colocated" in r["fell_back"])
    mismatch_url = chaos.mismatch.url
    to_mismatch = Counter(r.get("mode") for r in everything
                          if r.get("decode_backend") == mismatch_url)
    load_reasons = Counter(v["reason"] for v in bad_loads.values())
    goals = {}
    for g in GOALS:
        v = summary[g]["total"]
        goals[g] = {"value": v, "met": v == 0}
    return {
        "plan": plan,
        "summary": summary,
        "goals": goals,
        "errors_by_kind": dict(errors.most_common()),
        "problems": {k: dict(v.most_common()) for k, v in problems.items()},
        "fell_back_by_kind": dict(fb),
        "failed_kv_loads_by_reason": dict(load_reasons.most_common()),
        "decode_prompt_tokens": {**_local_compute(stack),
                                 "proxy_colocated_prompt_tokens": fb_tokens},
        "routed_to_mismatched_decode": dict(to_mismatch),
        "faults": chaos.faults,
        "flipped_byte": chaos.flip,
        "crashes": crashes,
        "probe_rounds": [{k: v for k, v in rnd.items() if k != "results"}
                         | {"identical": sum(r["outcome"] == "ok" for r in rnd["results"]),
                            "of": len(rnd["results"]),
                            "outcomes": [r["outcome"] for r in rnd["results"]],
                            "modes": [r.get("mode") for r in rnd["results"]]}
                         for rnd in chaos.probe_rounds],
        "leaked": leaked,
        "load_s": round(load_s, 1),
        "proxy_alive_at_end": stack.proxy is not None and stack.proxy.poll() is None,
        "events": stack.events,
        "log_dir": str(chaos.log_dir),
        "incarnations": [{"label": inc.label, "state": inc.state,
                          "t_start_s": round(inc.t_start, 1),
                          "t_ready_s": inc.t_ready and round(inc.t_ready, 1),
                          "log": str(inc.server.log_path)}
                         for _, inc in stack.incarnations()],
        "_requests": loads + probes + aimed,
    }


def _kinds(counter: dict, indent: str = "      ") -> list[str]:
    return [f"{indent}{v:4d}  {k}" for k, v in counter.items()]


def render(d: dict) -> str:
    s, plan = d["summary"], d["plan"]
    fb = d["fell_back_by_kind"]
    leaked = d["leaked"]
    kv = plan["kvbridge_extra_config"]
    rows = []
    for key, label in ROWS:
        v = s[key]
        if "load" in v:
            rows.append([label, v["load"], v["probes"], v["aimed"], v["total"]])
        else:
            rows.append([label, "", "", "", "-" if v["total"] is None else v["total"]])
    out = [f"kvbridge bench chaos: {plan['requests']} requests at concurrency "
           f"{plan['concurrency']} (+ {plan['probes']} probe prompts x "
           f"{len(d['probe_rounds'])} rounds), {plan['transport']} transport, "
           f"kv_load_failure_policy {plan['policy']} (decode-mismatch: "
           f"{plan['policies']['decode-mismatch']}), kvbridge {kv}; run "
           f"{d.get('duration_s', '?')} s, load {d['load_s']} s; machine load average "
           f"{_la(d, 'start')} at the start, {_la(d, 'end')} at the end", "",
           table(["outcome", "load", "probes", "aimed", "total"], rows), ""]
    out.append("Goal (wrong answers, hung requests, engine crashes, blocks held = 0): "
               + ", ".join(f"{k} {'met' if g['met'] else 'NOT met'} ({g['value']})"
                           for k, g in d["goals"].items()))
    out += ["", "load: through the proxy; probes: through the proxy, alone, checked against "
            "the colocated reference; aimed: the benchmark as the router, at a fault (below)",
            "answered correctly: load and aimed requests well-formed with exactly max_tokens "
            "tokens; probes identical to the colocated reference",
            "failed with a clear error, by kind:"] + (_kinds(d["errors_by_kind"]) or
                                                     ["      none"])
    out.append(f"fell back (within the outcomes above): proxy answered colocated (no prefill "
               f"usable) {fb.get('proxy_colocated', 0)}; decode recomputed after a failed KV load "
               f"{fb.get('decode_recomputed', 0)}; disaggregated answer without a KV transfer "
               f"figure {fb.get('no_kv_transfer_figure', 0)}")
    for key, label in (("wrong", "wrong answers"), ("unclear", "failed without a clear "
                                                               "error"), ("hung", "hung")):
        if d["problems"][key]:
            out += [f"{label}:"] + _kinds(d["problems"][key])
    for c in d["crashes"]:
        out.append(f"engine crash: {c['incarnation']} at {c['t_s']} s: {c['reason'][:300]}")
    out.append(f"blocks held: prefill vllm:kv_cache_usage_perc {leaked['prefill_kv_usage_end']}"
               f" (start {leaked['prefill_kv_usage_start']}, "
               f"{leaked['prefill_blocks_held']} of {leaked['prefill_num_blocks']} blocks) "
               f"after {leaked['settle_s']} s of settling (limit "
               f"{leaked['settle_limit_s']:.0f} s, lease {kv['lease_s']:.0f} s); decode "
               f"{leaked['decode_kv_usage_end']}")
    out += ["", "Faults (t: seconds since the start; proxy columns: seconds until the "
            "router's /health showed the instance out of / back in rotation):"]
    frows, notes = [], []
    for f in d["faults"]:
        if not f.get("fired"):
            frows.append([f["fault"], "-", "-", "-", "-", "not fired: " + f.get("note", "")])
            continue
        frows.append([f["fault"], f["t_s"], f["request_index"],
                      _s(f.get("proxy_noticed_down_s")), _s(f.get("proxy_back_in_rotation_s")),
                      _s(f.get("recovered_after_s"))])
        note = f"  {f['fault']}: {f['action']}"
        a = f.get("aimed")
        if a:
            note += (f"\n    aimed: {a['prefilled']}/{a['of']} prefilled, decode step at "
                     f"{a.get('decode_at', '-')}: {json.dumps(a.get('outcomes', {}))}, failed "
                     f"KV loads logged for {a.get('failed_loads_logged', 0)}")
        if f["fault"] == "mismatched_decode_joins":
            note += (f"; proxy quarantined it after {_s(f.get('proxy_quarantined_s'))} s: "
                     f"{f.get('quarantine') or 'NOT QUARANTINED'}")
        notes.append(note)
    out.append(table(["fault", "t", "at request", "proxy: down", "proxy: back",
                      "recovered s"], frows))
    out += notes
    flip = d["flipped_byte"]
    out.append("  flipped byte: " + (f"every {flip['every']}th landed pull on "
                                      f"{flip['active_on']} from {flip.get('from_t_s')} s on"
                                      if flip["active_on"] else flip["note"] or "not fired"))
    out += ["", "Probe rounds (each prompt alone through the proxy, nothing else running, "
            "compared with the colocated reference):"]
    out.append(table(["round", "t", "identical", "modes", "outcomes"],
                     [[r["round"], r["t_s"], f"{r['identical']}/{r['of']}",
                       ",".join(str(m) for m in r["modes"]), ",".join(r["outcomes"])]
                      for r in d["probe_rounds"]]))
    out += ["", "Failed KV loads in the decode logs, by reason:"]
    out += _kinds(d["failed_kv_loads_by_reason"]) or ["      none"]
    out += ["Decode prompt tokens (vllm:prompt_tokens_by_source, every decode incarnation): "
            + json.dumps(d["decode_prompt_tokens"]),
            "Requests answered by decode-mismatch, by mode: "
            + json.dumps(d["routed_to_mismatched_decode"]),
            f"kvbridge proxy alive at the end: {'yes' if d['proxy_alive_at_end'] else 'NO'}"]
    events = [e for e in d["events"] if "CRASH" in e or "restarting" in e or "failed to" in e]
    if events:
        out += ["", "Crash events:"] + events[:10]
    out += ["", f"Logs: {d['log_dir']}", ""]
    out += textwrap.wrap(
            "Method: prefill and decode each pinned to a core; faults fire when a share of "
            "the requests has been sent, so requests are in flight when they hit; while a "
            f"fault recovers one request is sent every {plan['recovery_send_interval_s']:g} s "
            f"(at most {plan['recovery_max_requests']} per fault). vLLM's CPU kernels are not "
            "batch-invariant, so only the probe prompts are compared with the colocated "
            "reference (a plain vLLM server, no connector, same block size, each prompt "
            "alone), each round with the load paused and drained. Aimed requests: the "
            "benchmark plays the router for a few requests per fault (prefill step on the "
            "producer, then the fault, then the decode step with the producer's "
            "kv_transfer_params), so pulls from a dead producer, from a stopped one and into a "
            "decode with another layout happen on every run. Engine crashes: a server "
            "process exiting by itself, /health answering an error, or vLLM's engine-death "
            "lines in its log before the benchmark killed it; a crashed engine is restarted "
            "and the run goes on. Blocks held: the prefill server's vllm:kv_cache_usage_perc "
            "after the load, waited for up to the lease plus 15 s.", 100)
    return "\n".join(out)


def _la(d: dict, when: str) -> str:
    v = (d.get("load_average") or {}).get(when)
    return "/".join(f"{x:.1f}" for x in v) if v else "?"


def _s(v) -> str:
    return "-" if v is None else f"{v:g}"


def write(d: dict, text: str, json_path: str | None) -> None:
    requests = d.pop("_requests", [])
    name = "chaos-quick" if d["plan"]["quick"] else "chaos"
    try:
        from pathlib import Path

        with open(Path(d["log_dir"]) / "requests.jsonl", "w") as f:
            for r in requests:
                f.write(json.dumps({k: v for k, v in r.items() if k != "text"}) + "\n")
    except OSError:
        pass
    path = write_results(name, d, text, json_path)
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
