# SPDX-License-Identifier: Apache-2.0
"""Run prompts through a real vLLM CPU engine (single process) and print JSON.

Usage: python vllm_generate.py MODEL_DIR BLOCK_SIZE MAX_TOKENS PROMPT [PROMPT ...]
Prints {"outputs": [[token ids], ...], "layout": {...}} on the last line.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _worker_layout(worker):
    """Runs inside the worker: derive kvbridge's layout from the live engine."""
    from kvbridge.vllm_layout import layout_from_vllm

    runner = worker.model_runner
    ctx = runner.compilation_config.static_forward_context
    kv = {name: layer.kv_cache for name, layer in ctx.items()
          if getattr(layer, "kv_cache", None) is not None and hasattr(layer.kv_cache, "shape")}
    layout = layout_from_vllm(runner.vllm_config, kv)
    first = next(iter(kv.values()))
    return {"layout": layout.to_dict(), "shape": list(first.shape)}


def main() -> None:
    model, block_size, max_tokens, *prompts = sys.argv[1:]
    from vllm import LLM, SamplingParams

    llm = LLM(model, enforce_eager=True, block_size=int(block_size), dtype="bfloat16",
              max_model_len=4096, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=int(max_tokens), ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    info = llm.collective_rpc(_worker_layout)[0]
    print(json.dumps({"outputs": [list(o.outputs[0].token_ids) for o in outs], **info}))


if __name__ == "__main__":
    main()
