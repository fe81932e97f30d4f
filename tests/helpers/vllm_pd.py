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
  {"cmd": "generate", "prompts": [...], "max_tokens": N}   colocated run
  {"cmd": "free_blocks"}                             -> {"free": n}
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
    llm = LLM(model, **{k: v for k, v in kw.items() if v is not None})
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
            tokens, errors = [], []
            try:
                outs = llm.generate(req["prompts"], sp, use_tqdm=False)
                for o in outs:
                    tokens.append(list(o.outputs[0].token_ids))
                    errors.append(o.outputs[0].finish_reason)
            except Exception as e:  # noqa: BLE001 - reported to the test
                errors.append(f"{type(e).__name__}: {e}")
            reply({"tokens": tokens, "finish": errors, "metrics": prompt_token_metrics(llm)})
        elif cmd == "transport":
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            worker = get_kv_transfer_group().connector_worker
            reply({"metrics": worker.agent.metrics(),
                   "layout": worker.cache.layout.to_dict()})
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
