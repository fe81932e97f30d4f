# SPDX-License-Identifier: Apache-2.0
"""The tiny model: deterministic build, loads in a real vLLM CPU engine."""

import json
import subprocess

import pytest

from conftest import HELPERS
from kvbridge import tiny_model
from kvbridge.layout import KVLayout

PROMPTS = ["Return a new list of the items in the sequence",
           "The socket module provides access to the BSD socket interface"]


def run_vllm(python_exe, model_dir, block_size=128, max_tokens=16, prompts=PROMPTS):
    proc = subprocess.run(
        [python_exe, str(HELPERS / "vllm_generate.py"), str(model_dir), str(block_size),
         str(max_tokens), *prompts],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_same_seed_same_files(tiny_model_dir, tmp_path):
    again = tiny_model.build(tmp_path / "again", seed=0)
    assert tiny_model.tree_digest(again) == tiny_model.tree_digest(tiny_model_dir)
    other = tiny_model.build(tmp_path / "other", seed=1)
    assert tiny_model.tree_digest(other) != tiny_model.tree_digest(tiny_model_dir)


def test_shape_and_tokenizer(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (2, 256, 4, 2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert 1900 <= len(tok) <= 2048 == cfg.vocab_size or len(tok) == cfg.vocab_size
    text = "def main(argv): return 0"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n") and "<|user|>\nhi" in chat


@pytest.mark.vllm
def test_loads_in_vllm_and_greedy_is_deterministic(tiny_model_dir, python_exe):
    first = run_vllm(python_exe, tiny_model_dir)
    second = run_vllm(python_exe, tiny_model_dir)
    assert first["outputs"] == second["outputs"]
    a, b = first["outputs"]
    assert len(a) == len(b) == 16 and a != b
    # Greedy continuation depends on the context (and hence on the KV cache).
    assert len(set(a)) > 4, f"degenerate output {a}"
    # The layout derived from the live engine's config and KV tensors.
    layout = KVLayout.from_dict(first["layout"])
    assert first["shape"][1:] == [2, 128, 128]  # [num_blocks, kv_heads, block_size, 2*head]
    assert (layout.num_layers, layout.num_kv_heads, layout.head_size, layout.block_size,
            layout.memory_layout, layout.kv_cache_dtype, layout.block_bytes) == (
        2, 2, 64, 128, "LBHNC", "bfloat16", 2 * 128 * 128 * 2)
