# SPDX-License-Identifier: Apache-2.0
"""kvbridge without vLLM: the plain-PyTorch engine of ``examples/custom_engine``.

* The engine itself: it computes what transformers' Llama computes, and a
  continuation from KV bytes copied into other blocks equals the one-engine
  generation bit for bit.
* The example end to end, per transport: two processes (prefill A, decode B)
  started by ``run.py``; B's continuation must equal the single-process
  generation exactly, and B must never run the prompt through its model.
* Engines that disagree (block size, KV dtype): refused at the handshake with
  the fields named, both processes stopped promptly, exit code 3.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbridge.transport import available

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "custom_engine"
RUN = EXAMPLE / "run.py"
TRANSPORTS = ["tcp", "cma", "nixl"]
ENV = {"UCX_NET_DEVICES": "lo", "HF_HUB_OFFLINE": "1"}
#: Both processes must be gone this soon after a refused handshake (the run
#: includes starting three Python processes that import torch).
MISMATCH_BOUND_S = 60


@pytest.fixture(scope="module")
def engine_mod():
    """``examples/custom_engine/engine.py``, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("custom_engine_example", EXAMPLE / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(model_dir: Path, *args: str, timeout: float = 300) -> tuple[int, dict, str]:
    """Run ``run.py --json``; returns (exit code, its report, its output)."""
    proc = subprocess.run(
        [sys.executable, str(RUN), "--model", str(model_dir), "--json", *args],
        cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert reports, f"no JSON report (exit {proc.returncode}):\n{out}"
    return proc.returncode, json.loads(reports[-1]), out


def assert_reaped(report: dict) -> None:
    """No child of run.py outlives it."""
    for role, pid in report["pids"].items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A recycled pid is possible in principle; ours would still be python.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"multiprocessing" not in cmdline, f"process {role} (pid {pid}) is still running"


# ---------------------------------------------------------------------- the engine

def test_engine_matches_transformers(engine_mod, tiny_model_dir):
    """Our forward pass is Llama's: same greedy tokens, logits within float noise."""
    import torch
    from transformers import LlamaForCausalLM

    eng = engine_mod.PagedEngine(tiny_model_dir, num_blocks=16, block_size=16)
    ids = eng.encode("Return a new list containing all items from the iterable")
    ours = eng.generate("r", ids, 12)
    assert len(eng.free_blocks) == 16               # generate() frees its blocks
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        hf_logits = model(torch.tensor([ids])).logits[0, -1]
    assert out[0, len(ids):].tolist() == ours
    eng.seq_lens["x"] = 0
    logits = eng._forward("x", ids)
    assert torch.allclose(logits, hf_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_adopted_blocks_continue_bit_identically(engine_mod, tiny_model_dir, kv_dtype):
    """Copy a prefilled request's blocks (bytes) into other block ids of a second
    engine: its continuation equals the first engine's, and it runs only decode steps."""
    import torch

    dtype = getattr(torch, kv_dtype)
    a = engine_mod.PagedEngine(tiny_model_dir, num_blocks=16, block_size=4, kv_dtype=dtype)
    b = engine_mod.PagedEngine(tiny_model_dir, num_blocks=16, block_size=4, kv_dtype=dtype)
    ids = a.encode("A custom key function can be supplied")   # several blocks, last partial
    first = a.prefill("r", ids)
    src = a.block_table("r")
    b.allocate(3)
    dst = b.allocate(len(src))[::-1]  # other ids, other order
    for ta, tb in zip(a.kv_tensors, b.kv_tensors):
        tb[dst] = ta[src]
    b.adopt("r", dst, len(ids))
    assert b.decode("r", first, 10) == a.decode("r", first, 10)
    assert b.forward_tokens == 10
    assert a.kv_layout().block_bytes == a.kv_tensors[0][0].numel() * a.kv_tensors[0].element_size()


def test_engine_block_bookkeeping(engine_mod, tiny_model_dir):
    eng = engine_mod.PagedEngine(tiny_model_dir, num_blocks=4, block_size=8)
    eng.prefill("r", list(range(1, 18)))            # 17 tokens -> 3 blocks
    assert len(eng.block_table("r")) == 3 and len(eng.free_blocks) == 1
    eng.decode("r", 5, 7)                           # 24 tokens: still 3 blocks
    assert len(eng.block_table("r")) == 3
    with pytest.raises(engine_mod.OutOfBlocksError):
        eng.decode("r", 5, 10)                      # needs a 5th block
    eng.free("r")
    assert sorted(eng.free_blocks) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="allocate"):
        eng.adopt("x", [0], 5)                      # free blocks cannot be adopted
    layout = eng.kv_layout()
    assert (layout.block_size, layout.num_layers, layout.num_kv_heads, layout.head_size,
            layout.memory_layout, layout.kv_cache_dtype) == (8, 2, 2, 64, "custom", "float32")


# ---------------------------------------------------------------------- two processes

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_process_continuation_is_exact(transport, tiny_model_dir):
    if transport not in available():
        pytest.fail(f"transport {transport} is not available here (its dependency failed to "
                    "import)")
    code, report, out = run_example(tiny_model_dir, "--transport", transport, "--tokens", "12")
    assert code == 0, out
    assert report["match"] and report["tokens"] == report["reference_tokens"], out
    assert len(report["tokens"]) == 12
    # B never ran the prompt: only its 11 decode steps went through its model.
    assert report["decode_steps"] == 11
    assert report["b_forward_tokens"] == 11
    assert report["a_forward_tokens"] == len(report["prompt_ids"])
    # B's blocks are numbered differently from A's, and every byte was pulled.
    b = report["b"]
    assert b["local_blocks"] != b["remote_blocks"]
    layout = report["a"]["layout"]
    assert report["bytes"] == len(b["remote_blocks"]) * layout["num_layers"] * layout["block_bytes"]
    assert report["a"]["reason"] == "read"           # A freed its blocks because B read them
    assert b["metrics"]["transfers_done"] == 1 and b["metrics"]["bytes_pulled"] == report["bytes"]
    assert_reaped(report)


@pytest.mark.parametrize("args, field, local, remote", [
    (["--block-size-b", "32"], "block_size", "32", "16"),
    (["--dtype-b", "bfloat16"], "kv_cache_dtype", "bfloat16", "float32"),
], ids=["block_size", "dtype"])
def test_mismatched_engines_are_refused_at_handshake(args, field, local, remote,
                                                     tiny_model_dir):
    code, report, out = run_example(tiny_model_dir, "--transport", "tcp", *args,
                                    timeout=2 * MISMATCH_BOUND_S)
    assert code == 3, out
    expected = f"{field}: local {local}, remote {remote}"
    assert expected in report["error"], report["error"]
    assert expected in out                                       # printed for the user
    assert "block_bytes" in report["error"]
    assert report["b"]["kind"] == "layout"
    assert [field, local, remote] in report["b"]["differences"]
    # A learned of the refusal too (from its side: local and remote swapped) and
    # let its blocks go instead of holding them until the lease ends.
    assert any(f"{field}: local {remote}, remote {local}" in r
               for r in report["a"]["metrics"]["refusals"])
    assert report["a"]["reason"] == "released"
    assert report["wall_s"] < MISMATCH_BOUND_S
    assert_reaped(report)
