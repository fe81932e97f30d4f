# SPDX-License-Identifier: Apache-2.0
"""One side of a prefill/decode pair: a real vLLM CPU engine with KVBridgeConnector.

Speaks JSON lines on stdin/stdout so a test can drive a producer and a consumer
as two processes:

  python vllm_pd.py ROLE MODEL_DIR '{"block_size":128, "extra":{...}, ...}'

Commands (one JSON object per line):
  {"cmd": "prefill", "prompts": [...]}               producer: max_tokens=1,
        do_remote_decode -> {"params": [kv_transfer_params, ...]}
  {"cmd": "decode", "prompts": [...], "params": [...], "max_tokens": N}
        consumer -> {"tokens": [[...], ...], "errors": [...], "metrics": {...}}
        With "digest_loads": true in the options, also "loads": one entry per
        prompt, {"local_block_ids": [...], "digests": [...]} or null - the
        blocks vLLM gave the request's external KV and their digests, taken
        when the load has landed and before any forward pass runs on them
        (see ``record_loads``).
  {"cmd": "generate", "prompts": [...], "max_tokens": N}   colocated run
  {"cmd": "digest", "block_ids": [...]}              -> {"digests": [hex, ...]}
        sha256 per block id over that block's bytes in every layer, in layer
        order (``kv_digests``): e.g. a producer's ``remote_block_ids``.
  {"cmd": "free_blocks"}                             -> {"free": n}
  {"cmd": "reset_prefix_cache"}                      -> {"ok": bool}
  {"cmd": "metrics"}                                 -> {"metrics": {...}} (as decode's)
  {"cmd": "transport"}                               -> kvbridge transport metrics
  {"cmd": "step", "n": k}                            run k idle engine steps
  {"cmd": "exit"}
"""

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch allocates anything
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def reply(obj) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def prompt_token_metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:prompt_tokens_by_source", "vllm:prompt_tokens_by_source_total"):
            out[m.labels.get("source")] = out.get(m.labels.get("source"), 0) + int(m.value)
    return out


def free_blocks(llm) -> int:
    core = llm.llm_engine.engine_core.engine_core
    return core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def kv_digests(worker, block_ids: list[int]) -> list[str]:
    """Runs in the worker: sha256 of each block's bytes in every layer's KV
    tensor, layers in numeric order. Reads vLLM's tensors directly (block index
    on dim 0, or dim 1 of a K/V-split ``[2, num_blocks, ...]`` tensor), not
    through kvbridge's layout, so it checks a transfer independently of it."""
    import hashlib

    import torch

    from kvbridge.vllm.layout import ordered_layer_names

    ctx = worker.model_runner.compilation_config.static_forward_context
    kv = {name: layer.kv_cache for name, layer in ctx.items()
          if isinstance(getattr(layer, "kv_cache", None), torch.Tensor)}
    tensors = [kv[n] for n in ordered_layer_names(kv)]
    out = []
    for b in block_ids:
        h = hashlib.sha256()
        for t in tensors:
            block = t[:, b] if t.ndim == 5 and t.shape[0] == 2 else t[b]
            h.update(block.contiguous().view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def record_loads(llm, digest: bool) -> dict:
    """Request id -> the local blocks of its external KV load, recorded when
    vLLM's scheduler takes the finished load in (``_update_waiting_for_remote_kv``,
    vLLM 0.32): after the connector reported it received and before the request
    runs a forward pass. That pass recomputes the last prompt token (vLLM needs
    its logits) and so rewrites that token's KV slot, and decode then appends to
    the last block: digests taken after ``generate`` returns would no longer be
    the bytes that landed. Works with any connector."""
    core = llm.llm_engine.engine_core.engine_core
    sched = core.scheduler
    original = sched._update_waiting_for_remote_kv
    loads: dict = {}

    def hooked(request):
        rid = request.request_id
        ids = list(sched.kv_cache_manager.get_block_ids(rid)[0])
        rec = {"local_block_ids": ids, "num_computed_tokens": request.num_computed_tokens,
               "failed": rid in sched.failed_recving_kv_req_ids}
        if digest:
            rec["digests"] = core.model_executor.collective_rpc(kv_digests, args=(ids,))[0]
        loads[rid] = rec
        return original(request)

    sched._update_waiting_for_remote_kv = hooked
    return loads


def main() -> None:
    role, model, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    from vllm import LLM, SamplingParams

    kw = dict(enforce_eager=True, block_size=opts.get("block_size", 128),
              dtype=opts.get("dtype", "bfloat16"), max_model_len=4096, seed=0,
              disable_log_stats=False, enable_prefix_caching=opts.get("prefix_caching", True),
              num_gpu_blocks_override=opts.get("num_blocks"))
    if role != "colocated":
        ktc = {"kv_connector": opts.get("connector", "KVBridgeConnector"), "kv_role": role,
               "kv_port": opts.get("port", 14579),
               "kv_load_failure_policy": opts.get("policy", "fail"),
               "kv_connector_extra_config": opts.get("extra", {})}
        if opts.get("module_path"):
            ktc["kv_connector_module_path"] = opts["module_path"]
        kw["kv_transfer_config"] = ktc
    if opts.get("kv_buffer_device"):  # NixlConnector: "cpu"
        kw["kv_transfer_config"]["kv_buffer_device"] = opts["kv_buffer_device"]
    llm = LLM(model, **{k: v for k, v in kw.items() if v is not None})
    loads = record_loads(llm, digest=True) if opts.get("digest_loads") else None
    reply({"ready": True, "free": free_blocks(llm)})
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "prefill":
            sp = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                                 extra_args={"kv_transfer_params": {"do_remote_decode": True}})
                  for _ in req["prompts"]]
            outs = llm.generate(req["prompts"], sp, use_tqdm=False)
            # An API server's engine loop keeps stepping while finished requests
            # hold blocks; offline, step once so the worker publishes them.
            core = llm.llm_engine.engine_core.engine_core
            if core.scheduler.has_requests():
                core.step_fn()
            reply({"params": [o.kv_transfer_params for o in outs],
                   "first_tokens": [list(o.outputs[0].token_ids) for o in outs],
                   "prompt_lens": [len(o.prompt_token_ids) for o in outs]})
        elif cmd in ("decode", "generate"):
            params = req.get("params") or [None] * len(req["prompts"])
            sp = [SamplingParams(temperature=0, max_tokens=req["max_tokens"], ignore_eos=True,
                                 extra_args={"kv_transfer_params": p} if p else None)
                  for p in params]
            tokens, errors, got = [], [], []
            if loads is not None:
                loads.clear()
            try:
                outs = llm.generate(req["prompts"], sp, use_tqdm=False)
                for o in outs:
                    tokens.append(list(o.outputs[0].token_ids))
                    errors.append(o.outputs[0].finish_reason)
                    # vLLM's internal id is the caller's id plus "-<8 chars>".
                    got.append(next((v for k, v in (loads or {}).items()
                                     if k.rsplit("-", 1)[0] == o.request_id), None))
            except Exception as e:  # noqa: BLE001 - reported to the test
                errors.append(f"{type(e).__name__}: {e}")
            out = {"tokens": tokens, "finish": errors, "metrics": prompt_token_metrics(llm)}
            if loads is not None:
                out["loads"] = got
            reply(out)
        elif cmd == "digest":
            reply({"digests": llm.collective_rpc(kv_digests, args=(req["block_ids"],))[0]})
        elif cmd == "transport":
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            worker = get_kv_transfer_group().connector_worker
            reply({"metrics": worker.agent.metrics(),
                   "layout": worker.cache.layout.to_dict()})
        elif cmd == "kv_caches":
            # vLLM >= 0.33's sleep-mode hooks, called as its GPU worker calls
            # them around sleep() / wake_up() (vLLM 0.32's CPU worker never does).
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            getattr(get_kv_transfer_group(), req["hook"])()
            reply({"ok": True})
        elif cmd == "metrics":
            reply({"metrics": prompt_token_metrics(llm)})
        elif cmd == "reset_prefix_cache":
            reply({"ok": bool(llm.reset_prefix_cache())})
        elif cmd == "free_blocks":
            reply({"free": free_blocks(llm)})
        elif cmd == "step":
            core = llm.llm_engine.engine_core.engine_core
            for _ in range(req.get("n", 1)):
                if core.scheduler.has_requests():
                    core.step_fn()
            reply({"free": free_blocks(llm)})
        elif cmd == "exit":
            reply({"bye": True})
            break


if __name__ == "__main__":
    main()
