# SPDX-License-Identifier: Apache-2.0
"""Run prompts through a real vLLM CPU engine (single process) and print JSON.

Usage: python vllm_generate.py MODEL_DIR BLOCK_SIZE MAX_TOKENS PROMPT [PROMPT ...]

Extra ``LLM(...)`` keyword arguments may come as JSON in ``VLLM_GENERATE_ARGS``
(e.g. ``{"enable_prefix_caching": false}``).

Every prompt runs twice (two ``generate`` calls, the second after the first has
finished), so one engine start checks that greedy output is deterministic.
Prints on the last line::

    {"outputs": [[token ids], ...],   # first pass
     "repeat": [[token ids], ...],    # second pass
     "layout": {...} | null, "layout_error": str | null,
     "shape": [...],                  # the first layer's KV tensor
     "kv": {layer: {"shape", "dtype", "backend", "data_ptr"}},
     "groups": [{"spec", "layers", "block_size", "sliding_window"}],
     "block_size": int, "engine_start_s": float}

``layout`` comes from ``kvbridge.vllm.layout.layout_from_vllm``; where that
refuses the engine's caches (hybrid models) it is null and ``layout_error``
says why.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates anything
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _backend_name(layer) -> str:
    backend = getattr(layer, "attn_backend", None) or getattr(layer, "backend", None)
    if backend is not None and hasattr(backend, "get_name"):
        return backend.get_name()
    impl = getattr(layer, "impl", None)
    return type(impl).__name__ if impl is not None else "?"


def _worker_info(worker):
    """Runs inside the worker: KV tensors, cache groups and kvbridge's layout."""
    from kvbridge.vllm.layout import layout_from_vllm, ordered_layer_names

    runner = worker.model_runner
    ctx = runner.compilation_config.static_forward_context
    layers = {name: layer for name, layer in ctx.items()
              if getattr(layer, "kv_cache", None) is not None
              and hasattr(layer.kv_cache, "shape")}
    kv = {name: layer.kv_cache for name, layer in layers.items()}
    names = ordered_layer_names(kv)
    try:
        layout, error = layout_from_vllm(runner.vllm_config, kv).to_dict(), None
    except ValueError as e:  # hybrid caches: report the shapes without a layout
        layout, error = None, f"{type(e).__name__}: {e}"
    groups = []
    for g in runner.kv_cache_config.kv_cache_groups:
        spec = g.kv_cache_spec
        groups.append({"spec": type(spec).__name__, "layers": list(g.layer_names),
                       "block_size": spec.block_size,
                       "sliding_window": getattr(spec, "sliding_window", None)})
    return {
        "layout": layout, "layout_error": error,
        "shape": list(kv[names[0]].shape),
        "kv": {n: {"shape": list(kv[n].shape), "dtype": str(kv[n].dtype).removeprefix("torch."),
                   "backend": _backend_name(layers[n]), "data_ptr": kv[n].data_ptr()}
               for n in names},
        "groups": groups,
        "block_size": runner.vllm_config.cache_config.block_size,
    }


def main() -> None:
    model, block_size, max_tokens, *prompts = sys.argv[1:]
    from vllm import LLM, SamplingParams

    extra = json.loads(os.environ.get("VLLM_GENERATE_ARGS") or "{}")
    t0 = time.monotonic()
    llm = LLM(model, enforce_eager=True, block_size=int(block_size), dtype="bfloat16",
              max_model_len=4096, seed=0, **extra)
    start_s = time.monotonic() - t0
    sp = SamplingParams(temperature=0, max_tokens=int(max_tokens), ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    again = llm.generate(prompts, sp, use_tqdm=False)
    info = llm.collective_rpc(_worker_info)[0]
    print(json.dumps({"outputs": [list(o.outputs[0].token_ids) for o in outs],
                      "repeat": [list(o.outputs[0].token_ids) for o in again],
                      "engine_start_s": round(start_s, 1), **info}))


if __name__ == "__main__":
    main()
