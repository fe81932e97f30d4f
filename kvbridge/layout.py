# SPDX-License-Identifier: Apache-2.0
"""The KV layout contract: what must agree for KV bytes to mean the same thing.

Two engines can exchange KV-cache blocks only if a block of bytes written by
one is read the same way by the other. ``KVLayout`` names every property that
decides this, ``check_compatible`` compares two of them field by field and
refuses with *all* differing fields named, and ``fingerprint`` is a short hash
for cheap comparison (e.g. by a router pairing instances).

A layout is derivable from plain numbers and tensors (``KVLayout.from_tensors``,
no vLLM import) or from a vLLM config plus the KV tensors vLLM registers
(``kvbridge.vllm.layout.layout_from_vllm``).

Memory layouts use vLLM's names (``vllm/v1/kv_cache_layout.py``, RFC #42082):
the logical per-layer shape is ``[B, H, N, C]`` - blocks, KV heads, tokens in
the block, content (K and V, ``2 * head_size`` elements) - and the name gives
the physical order:

* ``"LBHNC"``  ``[num_blocks, kv_heads, block_size, 2 * head_size]`` per layer
  (vLLM's CPU backend; FlashInfer calls it ``HND``).
* ``"LBNHC"``  ``[num_blocks, block_size, kv_heads, 2 * head_size]`` per layer
  (FlashInfer's ``NHD``).
* ``"custom"`` anything else a custom engine declares; both sides must say the
  same name and the same ``block_bytes``.

``"HND"`` and ``"NHD"`` are accepted as aliases and stored by vLLM's name.

In every case a *region* is a tensor whose first dimension is the block index
and whose blocks are each ``block_bytes`` contiguous bytes; engines that keep
K and V apart declare ``regions_per_layer=2``. Blocks are copied whole, so
layouts differ only in how the bytes inside a block are interpreted - which is
exactly why they must match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from kvbridge.errors import LayoutMismatchError
# The layout descriptor travels in the handshake, so it carries the wire
# protocol's version (its changelog: ``kvbridge.protocol``).
from kvbridge.wire_version import PROTOCOL_VERSION

if TYPE_CHECKING:
    import torch

#: Block-contiguous memory layouts kvbridge knows by name.
MEMORY_LAYOUTS = ("LBHNC", "LBNHC", "custom")
_LAYOUT_ALIASES = {"HND": "LBHNC", "NHD": "LBNHC"}

_DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that must agree for KV bytes to mean the same on both sides.

    Attributes:
        model: model identity (name or path as the engine knows it).
        model_dtype: dtype of the model weights/activations.
        kv_cache_dtype: dtype of the KV-cache elements.
        num_layers: attention layers holding a paged KV cache.
        num_kv_heads: KV heads of the whole model (all TP ranks).
        kv_heads_per_rank: KV heads held by this rank.
        head_size: elements per head.
        block_size: tokens per block.
        memory_layout: one of ``MEMORY_LAYOUTS`` (see the module docstring).
        regions_per_layer: separately addressed block arrays per layer.
        block_bytes: bytes of one block in one region.
        tp_size: tensor-parallel world size.
        tp_rank: this rank.
        kv_lora_rank: MLA only (else 0): the compressed latent's width; with
            ``rope_head_dim`` it makes ``head_size``. One latent per token,
            the same on every TP rank (``num_kv_heads`` 1).
        rope_head_dim: MLA only (else 0): the rotary part of the latent.
        kv_cache_groups: a hybrid model's KV cache groups (vLLM's hybrid
            allocator: full and sliding-window layers), one description each;
            empty for one group. ``num_layers`` then counts the distinct
            buffers the groups share.
        protocol_version: ``PROTOCOL_VERSION`` of the side that built it.
    """

    model: str
    model_dtype: str
    kv_cache_dtype: str
    num_layers: int
    num_kv_heads: int
    kv_heads_per_rank: int
    head_size: int
    block_size: int
    memory_layout: str
    regions_per_layer: int = 1
    block_bytes: int
    tp_size: int = 1
    tp_rank: int = 0
    kv_lora_rank: int = 0
    rope_head_dim: int = 0
    kv_cache_groups: tuple[str, ...] = ()
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "kv_heads_per_rank", "head_size",
                     "block_size", "regions_per_layer", "block_bytes", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"KVLayout.tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if self.kv_lora_rank < 0 or self.rope_head_dim < 0:
            raise ValueError("KVLayout.kv_lora_rank and rope_head_dim must be >= 0")
        if self.memory_layout not in MEMORY_LAYOUTS:
            raise ValueError(f"KVLayout.memory_layout {self.memory_layout!r} is not one of "
                             f"{list(MEMORY_LAYOUTS)}")

    @property
    def is_mla(self) -> bool:
        """A multi-head latent attention cache (one latent per token, every rank)."""
        return self.kv_lora_rank > 0

    @property
    def num_regions(self) -> int:
        """Block arrays in all: one per layer, or K and V per layer."""
        return self.num_layers * self.regions_per_layer

    @property
    def bytes_per_block_all_layers(self) -> int:
        """Bytes moved per block id (every region)."""
        return self.num_regions * self.block_bytes

    def fingerprint(self) -> str:
        """Short stable hash of every field (16 hex chars of SHA-256)."""
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:16]

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVLayout:
        return msgspec.convert(data, cls)

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> KVLayout:
        return msgspec.json.decode(data, type=cls)

    @classmethod
    def from_tensors(
        cls,
        regions: Sequence[torch.Tensor],
        *,
        model: str,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        memory_layout: str = "custom",
        regions_per_layer: int = 1,
        model_dtype: str | None = None,
        tp_size: int = 1,
        tp_rank: int = 0,
        kv_lora_rank: int = 0,
        rope_head_dim: int = 0,
    ) -> KVLayout:
        """Describe a paged KV cache handed in as plain tensors.

        Args:
            regions: per-layer paged tensors (one per layer, or K then V per
                layer for split layouts); dim 0 is the block index.
            model: model identity both sides agree on.
            block_size: tokens per block.
            num_kv_heads: KV heads of the whole model.
            head_size: elements per head.
            memory_layout: a name from ``MEMORY_LAYOUTS``.
            regions_per_layer: 2 when K and V are separate tensors per layer.
            model_dtype: defaults to the tensors' dtype.
            tp_size, tp_rank: tensor parallelism of this engine.
            kv_lora_rank: MLA only: the latent's compressed width (``head_size``
                is then ``kv_lora_rank + rope_head_dim``, ``num_kv_heads`` 1).
            rope_head_dim: MLA only: the latent's rotary part.
        """
        if not regions:
            raise ValueError("at least one KV tensor is required")
        first = regions[0]
        dtype = dtype_name(first.dtype)
        for i, t in enumerate(regions):
            if t.dtype != first.dtype or tuple(t.shape) != tuple(first.shape):
                raise ValueError(
                    f"KV tensor {i} has shape {tuple(t.shape)} dtype {t.dtype}; tensor 0 has "
                    f"{tuple(first.shape)} {first.dtype}: all regions must be alike")
        memory_layout = normalize_memory_layout(memory_layout)
        rpl = regions_per_layer
        if len(regions) % rpl:
            raise ValueError(f"{len(regions)} KV tensors is not a multiple of regions_per_layer={rpl}")
        if tp_size <= 0 or num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} cannot be split over tp_size={tp_size}")
        block_bytes = first[0].numel() * first.element_size()
        return cls(
            model=model,
            model_dtype=model_dtype or dtype,
            kv_cache_dtype=dtype,
            num_layers=len(regions) // rpl,
            num_kv_heads=num_kv_heads,
            kv_heads_per_rank=max(1, num_kv_heads // tp_size),
            head_size=head_size,
            block_size=block_size,
            memory_layout=memory_layout,
            regions_per_layer=rpl,
            block_bytes=block_bytes,
            tp_size=tp_size,
            tp_rank=tp_rank,
            kv_lora_rank=kv_lora_rank,
            rope_head_dim=rope_head_dim,
        )


def normalize_memory_layout(name: str) -> str:
    """vLLM's layout name for ``name`` (``"HND"`` -> ``"LBHNC"``); raises if unknown."""
    name = _LAYOUT_ALIASES.get(name, name)
    if name not in MEMORY_LAYOUTS:
        raise ValueError(f"unknown memory_layout {name!r}; known: {list(MEMORY_LAYOUTS)} "
                         f"(aliases {sorted(_LAYOUT_ALIASES)})")
    return name


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; strings pass through."""
    name = str(dtype)
    return name.removeprefix("torch.")


def dtype_size(name: str) -> int:
    try:
        return _DTYPE_SIZES[name]
    except KeyError:
        raise ValueError(f"unknown KV dtype {name!r}; known: {sorted(_DTYPE_SIZES)}") from None


def layout_differences(local: KVLayout, remote: KVLayout) -> list[tuple[str, object, object]]:
    """Every field that differs, in declaration order, as (field, local, remote)."""
    return [
        (name, getattr(local, name), getattr(remote, name))
        for name in local.__struct_fields__
        if getattr(local, name) != getattr(remote, name)
    ]


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Raise ``LayoutMismatchError`` naming every differing field, else return.

    Symmetric TP is assumed: rank r of one side pairs with rank r of the other,
    so ``tp_rank`` must agree too.
    """
    diffs = layout_differences(local, remote)
    if diffs:
        raise LayoutMismatchError(diffs)


#: Fields that may differ between a producer rank and a consumer rank whose
#: tensor parallelism differs: the plan in ``kvbridge.cache.shard`` bridges them.
TP_FIELDS = ("tp_size", "tp_rank", "kv_heads_per_rank", "block_bytes")


def check_pairable(local: KVLayout, remote: KVLayout) -> None:
    """Raise ``LayoutMismatchError`` unless a rank of ``local`` can read KV from
    a rank of ``remote``: every field equal but the ``TP_FIELDS``, and those
    bridged by a split of the KV heads (``kvbridge.cache.shard``).

    Equal TP pairs rank r with rank r, whole blocks. Different TP sizes need a
    layout whose heads can be sliced out of a block (``LBHNC``: a contiguous
    range of each block; ``LBNHC``: a regular stride) - a ``custom`` layout
    moves whole blocks only, and is refused naming ``tp_size`` and the layout.
    """
    every = layout_differences(local, remote)
    if any(d[0] not in TP_FIELDS for d in every):
        # A real mismatch: name every differing field (a rank differs anyway).
        raise LayoutMismatchError([d for d in every if d[0] != "tp_rank"])
    tp_diffs = [d for d in layout_differences(local, remote) if d[0] in TP_FIELDS]
    if local.tp_size == remote.tp_size:
        # Symmetric: rank r reads rank r's blocks whole.
        if [d for d in tp_diffs if d[0] != "tp_rank"]:
            raise LayoutMismatchError(tp_diffs)
        return
    if local.memory_layout == "custom":
        raise LayoutMismatchError(
            [d for d in tp_diffs if d[0] != "tp_rank"] + [("memory_layout", "custom", "custom")],
            "a custom memory layout moves whole blocks only, so both sides need the same "
            "tp_size")
    # Bytes per head per block must agree, else the heads are not the same size.
    if local.block_bytes * remote.kv_heads_per_rank != remote.block_bytes * local.kv_heads_per_rank:
        raise LayoutMismatchError(
            [d for d in tp_diffs if d[0] != "tp_rank"],
            f"{local.block_bytes // local.kv_heads_per_rank} bytes per KV head and block here, "
            f"{remote.block_bytes // remote.kv_heads_per_rank} there")
