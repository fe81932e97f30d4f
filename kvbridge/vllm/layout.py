# SPDX-License-Identifier: Apache-2.0
"""Derive a ``KVLayout`` from a vLLM config and the KV tensors vLLM registers.

Kept apart from ``kvbridge.layout`` so that module never imports vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbridge.cache.mirror import kv_block_regions
from kvbridge.layout import KVLayout, dtype_name, normalize_memory_layout

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig


def memory_layout_of(vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor]) -> str:
    """vLLM's physical layout name for these caches (``"LBHNC"`` on the CPU backend)."""
    first = next(iter(kv_caches.values()))
    if getattr(vllm_config.model_config, "use_mla", False):
        # One latent per token, no head axis: [num_blocks, block_size, latent]
        # (a head axis of 1, if any, changes nothing): LBNHC with one head.
        return "LBNHC"
    if first.device.type == "cpu":
        # vLLM's CPU attention backend supports exactly LBHNC:
        # [num_blocks, kv_heads, block_size, 2 * head_size].
        return "LBHNC"
    try:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout

        layout = get_kv_cache_layout()
        return normalize_memory_layout(str(getattr(layout, "value", layout)))
    except Exception:  # a vLLM without the helper, or a name kvbridge does not know
        return "custom"


def describe_kv_cache_groups(kv_cache_config) -> tuple[str, ...]:
    """One line per KV cache group of a hybrid model (vLLM's HMA), e.g.
    ``"SlidingWindowSpec(window=64) x 2 layers"``; empty for one group."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    if len(groups) <= 1:
        return ()
    out = []
    for g in groups:
        spec = g.kv_cache_spec
        window = getattr(spec, "sliding_window", None)
        out.append(f"{type(spec).__name__}" + (f"(window={window})" if window else "")
                   + f" x {len(g.layer_names)} layers")
    return tuple(out)


def layout_from_vllm(vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor],
                     model_name: str | None = None, kv_cache_config=None) -> KVLayout:
    """The layout of one worker's KV cache.

    Args:
        vllm_config: the engine's config (model, cache and parallel parts).
        kv_caches: layer name -> paged tensor, as passed to
            ``KVConnectorBase_V1.register_kv_caches``.
        model_name: identity to advertise (default: the served model name, or
            the model path).
        kv_cache_config: vLLM's KV cache config; with several groups (hybrid
            models) they become part of the layout, and layers that share
            memory across groups count once (``distinct_layer_names``).
    """
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    tensors = [kv_caches[name] for name in distinct_layer_names(kv_caches)]
    first = tensors[0]
    first_region = kv_block_regions(first)[0]
    block_bytes = first_region[0].numel() * first.element_size()
    for name, t in kv_caches.items():
        if t.shape != first.shape:
            raise ValueError(f"KV tensor {name} shape {tuple(t.shape)} differs from "
                             f"{tuple(first.shape)}: hybrid/heterogeneous caches are not supported")
    served = getattr(mc, "served_model_name", None)
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    mla = bool(getattr(mc, "use_mla", False))
    hf = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
    return KVLayout(
        model=model_name or served or mc.model,
        model_dtype=dtype_name(mc.dtype),
        kv_cache_dtype=dtype_name(first.dtype) if cc.cache_dtype == "auto" else str(cc.cache_dtype),
        num_layers=len(tensors),
        # MLA: one latent per token, replicated on every TP rank.
        num_kv_heads=1 if mla else mc.get_total_num_kv_heads(),
        kv_heads_per_rank=1 if mla else mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        block_size=cc.block_size,
        memory_layout=memory_layout_of(vllm_config, kv_caches),
        regions_per_layer=len(kv_block_regions(first)),
        block_bytes=block_bytes,
        tp_size=pc.tensor_parallel_size,
        tp_rank=getattr(pc, "rank", 0) % max(1, pc.tensor_parallel_size),
        kv_lora_rank=int(getattr(hf, "kv_lora_rank", 0) or 0) if mla else 0,
        rope_head_dim=int(getattr(hf, "qk_rope_head_dim", 0) or 0) if mla else 0,
        kv_cache_groups=describe_kv_cache_groups(kv_cache_config),
    )


def _layer_index(name: str) -> tuple[int, str]:
    """Order layers numerically ("layers.10" after "layers.9")."""
    import re

    nums = [int(x) for x in re.findall(r"\d+", name)]
    return (nums[0] if nums else -1, name)


def ordered_layer_names(kv_caches: dict[str, torch.Tensor]) -> list[str]:
    return sorted(kv_caches, key=_layer_index)


def distinct_layer_names(kv_caches: dict[str, torch.Tensor]) -> list[str]:
    """Layer names in order, skipping a layer whose tensor is the same memory
    as an earlier one's: vLLM's hybrid allocator lays the layers of every KV
    cache group over the same buffers (layer k of each group shares one), and
    a block id belongs to one group at a time - so moving block b of each
    shared buffer once moves exactly its group's layers."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for name in ordered_layer_names(kv_caches):
        t = kv_caches[name]
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def ordered_kv_regions(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Block-indexed regions in layer order (K before V when split), each
    distinct memory once: what ``PagedKVCache`` wraps for a layout from
    ``layout_from_vllm``."""
    return [r for name in distinct_layer_names(kv_caches) for r in kv_block_regions(kv_caches[name])]
