# SPDX-License-Identifier: Apache-2.0
"""Derive a ``KVLayout`` from a vLLM config and the KV tensors vLLM registers.

Kept apart from ``kvbridge.layout`` so that module never imports vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbridge.blocks import kv_block_regions
from kvbridge.layout import KVLayout, dtype_name, normalize_memory_layout

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig


def memory_layout_of(vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor]) -> str:
    """vLLM's physical layout name for these caches (``"LBHNC"`` on the CPU backend)."""
    first = next(iter(kv_caches.values()))
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


def layout_from_vllm(vllm_config: VllmConfig, kv_caches: dict[str, torch.Tensor],
                     model_name: str | None = None) -> KVLayout:
    """The layout of one worker's KV cache.

    Args:
        vllm_config: the engine's config (model, cache and parallel parts).
        kv_caches: layer name -> paged tensor, as passed to
            ``KVConnectorBase_V1.register_kv_caches``.
        model_name: identity to advertise (default: the served model name, or
            the model path).
    """
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    tensors = [kv_caches[name] for name in ordered_layer_names(kv_caches)]
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
    return KVLayout(
        model=model_name or served or mc.model,
        model_dtype=dtype_name(mc.dtype),
        kv_cache_dtype=dtype_name(first.dtype) if cc.cache_dtype == "auto" else str(cc.cache_dtype),
        num_layers=len(tensors),
        num_kv_heads=mc.get_total_num_kv_heads(),
        kv_heads_per_rank=mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        block_size=cc.block_size,
        memory_layout=memory_layout_of(vllm_config, kv_caches),
        regions_per_layer=len(kv_block_regions(first)),
        block_bytes=block_bytes,
        tp_size=pc.tensor_parallel_size,
        tp_rank=getattr(pc, "rank", 0) % max(1, pc.tensor_parallel_size),
    )


def _layer_index(name: str) -> tuple[int, str]:
    """Order layers numerically ("layers.10" after "layers.9")."""
    import re

    nums = [int(x) for x in re.findall(r"\d+", name)]
    return (nums[0] if nums else -1, name)


def ordered_layer_names(kv_caches: dict[str, torch.Tensor]) -> list[str]:
    return sorted(kv_caches, key=_layer_index)


def ordered_kv_regions(kv_caches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Block-indexed regions in layer order (K before V when split): what
    ``PagedKVCache`` wraps for a layout from ``layout_from_vllm``."""
    return [r for name in ordered_layer_names(kv_caches) for r in kv_block_regions(kv_caches[name])]
