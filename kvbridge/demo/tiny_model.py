# SPDX-License-Identifier: Apache-2.0
"""Build a tiny but real model locally (no model hub needed).

``kvbridge tiny-model OUT_DIR [--arch ARCH]`` writes a Hugging Face model directory:

* a byte-level BPE tokenizer trained with ``tokenizers`` on local text (the
  docstrings of a fixed list of Python standard-library modules), with special
  tokens and a chat template;
* a random-weight ``LlamaForCausalLM`` (2 layers, hidden 256, 4 attention
  heads, 2 KV heads, head size 64, vocab = the tokenizer's, about 2048) saved as
  bf16 safetensors (``--arch llama``, the default).

Other architectures share the tokenizer and the weight recipe, each with the
KV-cache shape that makes it interesting:

* ``qwen3``: ``Qwen3ForCausalLM`` (q/k norm), 2 layers, 2 KV heads of 64;
* ``gemma3``: text-only ``Gemma3ForCausalLM``, 4 layers alternating sliding
  window (64 tokens) and full attention, so vLLM keeps two KV cache groups;
* ``deepseek_v2``: ``DeepseekV2ForCausalLM`` with multi-head latent attention
  (kv_lora_rank 512 + rope 64 = one 576-wide latent per token), dense MLPs only.

``--kv-shape llama8b`` keeps the architecture and its little compute but gives
the KV cache the shape of Llama-3-8B: 32 layers x 8 KV heads x 128 (bf16),
128 KiB per token - 256 MiB for a 2k-token prompt, the case disaggregation has
to move fast (``benchmarks/pd_compare``).

Weights are drawn with a larger standard deviation than usual so the logits
spread out and greedy decoding does not tie - and so any corruption of the KV
cache visibly changes the continuation. The same seed gives byte-identical
files on the same software stack.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path

#: Modules whose docstrings form the tokenizer's training text. Fixed so the
#: corpus (and hence the tokenizer) is the same on every build.
_CORPUS_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math", "operator",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "selectors", "shlex", "shutil",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "tokenize", "typing", "unittest", "urllib.parse", "uuid", "wave",
    "weakref", "xml.dom.minidom", "zipfile", "zlib",
)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

#: What every tiny architecture shares: small enough to build in seconds and
#: run two engines on two cores, wide enough that greedy output depends on
#: every KV byte.
_SMALL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
#: Shape of the tiny model (kept here so tests and benchmarks can refer to it).
TINY_CONFIG = dict(_SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=64,
                   rope_theta=10000.0, rms_norm_eps=1e-5)
#: Qwen3: like the Llama plus per-head q/k RMSNorm.
QWEN3_CONFIG = dict(TINY_CONFIG, rms_norm_eps=1e-6)
#: Gemma3 (text only): sliding-window and full-attention layers interleaved. The
#: window (64 tokens) is shorter than the test prompts, so the sliding layers
#: really drop old blocks.
GEMMA3_CONFIG = dict(
    _SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
    sliding_window=64, rms_norm_eps=1e-6,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
#: DeepSeek-V2 with MLA: vLLM caches one latent of kv_lora_rank + qk_rope_head_dim
#: = 576 values per token and layer (the only size vLLM's CPU MLA kernels take).
#: first_k_dense_replace = num_hidden_layers: every layer has a dense MLP, no
#: routed experts (the MoE fields are unused but kept small).
DEEPSEEK_V2_CONFIG = dict(
    _SMALL, num_hidden_layers=2, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=512,
    qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=2,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
    rope_theta=10000.0, rms_norm_eps=1e-6)
#: ``--kv-shape``: KV-cache shapes of real models on a tiny model (hidden 256):
#: name -> the fields it overrides. llama8b: Llama-3-8B's 32 layers x 8 KV heads
#: x head size 128 = 128 KiB of bf16 KV per token.
KV_SHAPES = {
    "llama8b": dict(num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=8,
                    head_dim=128),
}
#: Supported architectures, the first is the default.
ARCHS = ("llama", "qwen3", "gemma3", "deepseek_v2")
#: arch -> (config dict, transformers config class, model class).
_ARCH_SPECS = {
    "llama": (TINY_CONFIG, "LlamaConfig", "LlamaForCausalLM"),
    "qwen3": (QWEN3_CONFIG, "Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": (GEMMA3_CONFIG, "Gemma3TextConfig", "Gemma3ForCausalLM"),
    "deepseek_v2": (DEEPSEEK_V2_CONFIG, "DeepseekV2Config", "DeepseekV2ForCausalLM"),
}
TARGET_VOCAB = 2048
#: Init std: ~10x the usual 0.02 so logits spread out (no greedy ties).
INIT_STD = 0.2


def corpus_text() -> str:
    """Training text for the tokenizer: stdlib docstrings, in a fixed order."""
    parts: list[str] = []
    for name in _CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        doc = inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                d = inspect.getdoc(obj)
                if d:
                    parts.append(d)
    return "\n\n".join(parts)


def build_tokenizer(vocab_size: int = TARGET_VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = corpus_text()
    tok.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer)
    return tok


def arch_config(arch: str) -> dict:
    """The shape dict of ``arch`` (``TINY_CONFIG`` for llama)."""
    _check_arch(arch)
    return _ARCH_SPECS[arch][0]


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def kv_bytes_per_token(arch: str = "llama", kv_shape: str | None = None) -> int:
    """bf16 KV-cache bytes one token takes (K and V, every layer)."""
    shape = {**arch_config(arch), **KV_SHAPES.get(kv_shape or "", {})}
    return shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2 * 2


def _check_kv_shape(arch: str, kv_shape: str | None) -> None:
    if kv_shape is not None and kv_shape not in KV_SHAPES:
        raise ValueError(f"unknown kv shape {kv_shape!r}; choose from {', '.join(KV_SHAPES)}")
    if kv_shape is not None and arch not in ("llama", "qwen3"):
        raise ValueError(f"--kv-shape applies to llama and qwen3, not {arch}")


def build(out_dir: str | os.PathLike, seed: int = 0, arch: str = "llama",
          kv_shape: str | None = None) -> Path:
    """Write the tokenizer and model to ``out_dir``; returns the path."""
    _check_arch(arch)
    _check_kv_shape(arch, kv_shape)
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    shape, config_name, model_name = _ARCH_SPECS[arch]
    shape = {**shape, **KV_SHAPES.get(kv_shape or "", {})}
    config_cls = getattr(transformers, config_name)
    model_cls = getattr(transformers, model_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = build_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    vocab = len(tokenizer)
    config = config_cls(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=INIT_STD,
        **shape,
    )
    config.dtype = "bfloat16"
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * INIT_STD)
            # norms stay at 1.0
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        # Sampling defaults would make "greedy" runs depend on the client.
        cfg = json.loads(gen_cfg.read_text())
        cfg.update(do_sample=False)
        gen_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # The llama stamp carries no "arch" key, so its build stays byte-identical
    # to the one from before there were other architectures; read_arch() maps
    # a missing key to llama.
    stamp = {"seed": seed, "vocab_size": vocab, **shape}
    if arch != "llama":
        stamp["arch"] = arch
    if kv_shape is not None:
        stamp["kv_shape"] = kv_shape
    (out / "kvbridge_tiny_model.json").write_text(
        json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return out


def tree_digest(path: str | os.PathLike) -> str:
    """SHA-256 over every file's name and bytes (determinism checks)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def read_arch(path: str | os.PathLike) -> str:
    """The arch recorded in a build's stamp (builds without the key are llama)."""
    stamp = json.loads((Path(path) / "kvbridge_tiny_model.json").read_text())
    return stamp.get("arch", "llama")


def ensure(out_dir: str | os.PathLike, seed: int = 0, arch: str = "llama",
           kv_shape: str | None = None) -> Path:
    """Build into ``out_dir`` unless a complete build is already there."""
    _check_arch(arch)
    _check_kv_shape(arch, kv_shape)
    out = Path(out_dir)
    if (out / "kvbridge_tiny_model.json").exists() and (out / "model.safetensors").exists():
        found = read_arch(out)
        if found != arch:
            raise ValueError(f"{out} holds a tiny {found} model, not {arch}")
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    build(tmp, seed=seed, arch=arch, kv_shape=kv_shape)
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished first; its build is identical.
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_path(seed: int = 0, arch: str = "llama", kv_shape: str | None = None) -> Path:
    """Where tests and the demo cache the model (``KVBRIDGE_CACHE`` or ~/.cache/kvbridge).

    ``tiny-<arch>-<recipe>-s<seed>``: the recipe part is a hash of this file, so
    a change to the recipe never reuses a stale build.
    """
    _check_arch(arch)
    root = Path(os.environ.get("KVBRIDGE_CACHE", Path.home() / ".cache" / "kvbridge"))
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    return root / f"tiny-{arch}{'-kv' + kv_shape if kv_shape else ''}-{recipe}-s{seed}"
