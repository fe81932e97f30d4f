#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""One real prefill/decode pair with KVBridgeConnector in the current
environment, checked against colocated output: the P/D half of
``scripts/compat.sh``.

    python scripts/compat_pair.py --model TINY_MODEL_DIR [--transport tcp] [--json OUT]

Two vLLM API servers (prefill on core 0, decode on core 1). The colocated
reference comes from the prefill server itself, before any P/D request and
with its own ``cache_salt``, so the P/D prefill does not reuse its prefix
cache. For each prompt (shorter than a block; several blocks and a partial
one): prefill with ``max_tokens=1`` and ``do_remote_decode``, decode with the
returned ``kv_transfer_params``. Passes when every decode is token-identical
to colocated and decode's ``vllm:prompt_tokens_by_source_total`` counts every
prompt token as ``external_kv_transfer`` and none as ``local_compute``.
Exit status 0 on pass, 1 on a failed check, 2 when the servers did not come up.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

from kvbridge.serve.launch import free_port, kv_transfer_config, start_server, stop_all, \
    wait_healthy

PROMPTS = [
    "The socket module provides access to the BSD socket interface.",
    ("Return a new list containing all items from the iterable in ascending order; "
     "a custom key function can be supplied to customise the sort order. ") * 6,
]
MAX_TOKENS = 16
SERVED = "tiny"


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def complete(url: str, prompt: str, max_tokens: int, **extra) -> dict:
    return post(url + "/v1/completions", {"model": SERVED, "prompt": prompt,
                                          "max_tokens": max_tokens, "temperature": 0,
                                          "ignore_eos": True, **extra})


def prompt_sources(url: str) -> dict[str, int]:
    """vLLM's ``prompt_tokens_by_source`` counters, by source (empty when this
    vLLM does not export them)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for m in re.finditer(r'^vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\} '
                         r'([0-9.e+]+)$', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(2)))
    return out


def run(model: str, transport: str, log_dir: Path) -> dict:
    result: dict = {"transport": transport, "prompts": []}
    prefill = start_server("prefill", model, free_port(), cpu_core=0, log_dir=log_dir,
                           served_name=SERVED,
                           kv_config=kv_transfer_config("kv_producer", transport=transport,
                                                        kv_port=free_port()))
    decode = start_server("decode", model, free_port(), cpu_core=1, log_dir=log_dir,
                          served_name=SERVED,
                          kv_config=kv_transfer_config("kv_consumer", transport=transport,
                                                       kv_port=free_port()))
    t0 = time.monotonic()
    try:
        try:
            wait_healthy([prefill, decode], timeout_s=900)
        except (RuntimeError, TimeoutError) as e:
            result.update(ok=False, stage="start", error=str(e)[-4000:])
            return result
        result["startup_s"] = round(time.monotonic() - t0, 1)
        colocated = [complete(prefill.url, p, MAX_TOKENS, cache_salt="colocated")
                     for p in PROMPTS]
        before = prompt_sources(decode.url)
        prompt_tokens = 0
        for prompt, ref in zip(PROMPTS, colocated):
            p = complete(prefill.url, prompt, 1, kv_transfer_params={"do_remote_decode": True})
            params = p.get("kv_transfer_params")
            d = complete(decode.url, prompt, MAX_TOKENS, kv_transfer_params=params)
            n = d["usage"]["prompt_tokens"]
            prompt_tokens += n
            result["prompts"].append({
                "prompt_tokens": n, "kv_transfer_params": params is not None,
                "colocated": ref["choices"][0]["text"], "decode": d["choices"][0]["text"],
                "identical": d["choices"][0]["text"] == ref["choices"][0]["text"]})
        after = prompt_sources(decode.url)
        sources = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        result["decode_prompt_tokens_by_source"] = sources
        result["token_identical"] = all(x["identical"] for x in result["prompts"])
        result["decode_computed_no_prompt_token"] = (
            bool(sources) and sources.get("local_compute", 0) == 0
            and sources.get("external_kv_transfer", 0) == prompt_tokens)
        result["ok"] = result["token_identical"] and result["decode_computed_no_prompt_token"]
        result["stage"] = "pair"
        if not sources:
            result["error"] = "decode exports no vllm:prompt_tokens_by_source_total"
        return result
    except Exception as e:  # noqa: BLE001 - recorded: the table says why
        result.update(ok=False, stage=result.get("stage", "requests"),
                      error=f"{type(e).__name__}: {e}",
                      decode_log_tail=decode.log_tail(30), prefill_log_tail=prefill.log_tail(30))
        return result
    finally:
        stop_all([prefill, decode])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "cma", "nixl"])
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/kvbridge-compat-logs"))
    args = ap.parse_args()
    result = run(args.model, args.transport, args.log_dir)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    if result.get("stage") == "start":
        return 2
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
