# SPDX-License-Identifier: Apache-2.0
"""A small Llama engine in plain PyTorch with its own paged KV cache.

This is the "custom engine" of ``docs/custom-engine.md``: no vLLM, just the
pieces an engine needs for kvbridge to move its KV cache:

* per layer one tensor ``[num_blocks, 2, kv_heads, block_size, head_dim]``
  (K and V of a block side by side, so one block is one run of bytes);
* a free-block list and a block table per request;
* ``kv_layout()`` describing those tensors to kvbridge with plain numbers.

The model is the tiny Llama of ``kvbridge.demo.tiny_model`` (or any Llama of that
shape family): weights come from ``model.safetensors`` + ``config.json`` and
are cast to float32, and every computation runs in float32. Decoding is greedy,
so two engines holding the same KV bytes produce bit-identical continuations -
which is exactly what ``run.py`` checks after a transfer.

Only what the tiny model needs is implemented: RMSNorm, the default RoPE, GQA
attention without biases, a SiLU MLP and an untied ``lm_head``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvbridge.layout import KVLayout


class OutOfBlocksError(RuntimeError):
    """The KV cache has no free block left for a request."""


class PagedEngine:
    """Greedy Llama inference over a paged KV cache.

    Args:
        model_dir: a Hugging Face Llama directory (``config.json``,
            ``model.safetensors``, tokenizer files).
        num_blocks: blocks in the KV cache (per layer).
        block_size: tokens per block.
        kv_dtype: dtype the KV cache stores (computation is always float32).
    """

    def __init__(self, model_dir: str | Path, num_blocks: int = 64, block_size: int = 16,
                 kv_dtype: torch.dtype = torch.float32):
        self.model_dir = Path(model_dir)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self.num_layers: int = cfg["num_hidden_layers"]
        self.hidden: int = cfg["hidden_size"]
        self.num_heads: int = cfg["num_attention_heads"]
        self.num_kv_heads: int = cfg.get("num_key_value_heads", self.num_heads)
        self.head_dim: int = cfg.get("head_dim") or self.hidden // self.num_heads
        self.eps: float = cfg["rms_norm_eps"]
        # transformers 5 nests RoPE settings under "rope_parameters"; older
        # configs keep "rope_theta" at the top level.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only the default RoPE is implemented, not {rope['rope_type']!r}")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        self.eos_token_id: int | None = cfg.get("eos_token_id")

        # Weights are stored in bf16; casting once to float32 keeps every
        # matmul in one precision, so results depend only on the inputs.
        self.w = {k: v.to(torch.float32) for k, v in
                  load_file(str(self.model_dir / "model.safetensors")).items()}
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2,
                                                      dtype=torch.float32) / self.head_dim))

        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_dtype = kv_dtype
        # One tensor per layer, block index first: kvbridge copies whole
        # blocks, so each block (K and V of every KV head) must be contiguous.
        self.kv_tensors: list[torch.Tensor] = [
            torch.zeros(num_blocks, 2, self.num_kv_heads, block_size, self.head_dim,
                        dtype=kv_dtype)
            for _ in range(self.num_layers)
        ]
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}
        self.seq_lens: dict[str, int] = {}
        #: tokens that went through the model (prompt tokens + decode steps)
        self.forward_tokens = 0
        self._tokenizer = None

    # ------------------------------------------------------------------ cache
    def kv_layout(self) -> KVLayout:
        """What a peer's cache must match for our blocks to mean the same there."""
        return KVLayout.from_tensors(
            self.kv_tensors,
            # The directory name of the tiny model carries its recipe hash and
            # seed: same name, same weights. Use a real identity in production.
            model=self.model_dir.name,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_dim,
            memory_layout="custom",
            # We compute in float32 whatever the cache stores.
            model_dtype="float32",
        )

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks off the free list (e.g. as targets of a pull)."""
        if n > len(self.free_blocks):
            raise OutOfBlocksError(f"need {n} blocks, {len(self.free_blocks)} free")
        return [self.free_blocks.popleft() for _ in range(n)]

    def release_blocks(self, block_ids: Sequence[int]) -> None:
        """Put blocks from ``allocate`` back (e.g. after a failed pull)."""
        self.free_blocks.extend(int(b) for b in block_ids)

    def adopt(self, request_id: str, block_ids: Sequence[int], num_tokens: int) -> None:
        """Register blocks filled from outside (a pull) as ``request_id``'s first
        ``num_tokens`` tokens; ``block_ids`` come from ``allocate``."""
        ids = [int(b) for b in block_ids]
        if request_id in self.block_tables:
            raise ValueError(f"request {request_id!r} already exists")
        if len(ids) != self.blocks_needed(num_tokens):
            raise ValueError(f"{num_tokens} tokens need {self.blocks_needed(num_tokens)} "
                             f"blocks of {self.block_size}, got {len(ids)}")
        owned = {b for table in self.block_tables.values() for b in table}
        bad = [b for b in ids if b in owned or b in self.free_blocks]
        if bad:
            raise ValueError(f"blocks {bad} are free or owned by another request: "
                             "allocate() them first")
        self.block_tables[request_id] = ids
        self.seq_lens[request_id] = num_tokens

    def block_table(self, request_id: str) -> list[int]:
        return list(self.block_tables[request_id])

    def free(self, request_id: str) -> None:
        """Forget a request and return its blocks to the free list."""
        self.free_blocks.extend(self.block_tables.pop(request_id))
        del self.seq_lens[request_id]

    def _grow(self, request_id: str, num_tokens: int) -> list[int]:
        table = self.block_tables.setdefault(request_id, [])
        missing = self.blocks_needed(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))
        return table

    # ------------------------------------------------------------------ generation
    def prefill(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Run the prompt through the model, filling fresh blocks; returns the
        greedy next token (not yet in the cache)."""
        if request_id in self.block_tables:
            raise ValueError(f"request {request_id!r} already exists")
        if not token_ids:
            raise ValueError("empty prompt")
        self.seq_lens[request_id] = 0
        logits = self._forward(request_id, list(token_ids))
        return int(torch.argmax(logits))

    def decode(self, request_id: str, token: int, n: int) -> list[int]:
        """Greedy continuation: feed ``token`` (the last one generated, not yet
        in the cache), then each new one; returns ``n`` new tokens."""
        out: list[int] = []
        for _ in range(n):
            token = int(torch.argmax(self._forward(request_id, [token])))
            out.append(token)
        return out

    @torch.inference_mode()
    def _forward(self, request_id: str, token_ids: list[int]) -> torch.Tensor:
        """Append ``token_ids`` to the request's sequence; logits of the last one."""
        start = self.seq_lens[request_id]
        n = len(token_ids)
        total = start + n
        table = self._grow(request_id, total)
        self.forward_tokens += n

        pos = torch.arange(start, total)
        cos, sin = self._rope(pos)
        # Cache slot of each new token: (block id, offset in block).
        blk = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        off = pos % self.block_size
        # Causal mask over the whole sequence: new token i sits at start + i.
        mask = torch.arange(total)[None, :] <= pos[:, None]

        x = self.w["model.embed_tokens.weight"][torch.tensor(token_ids)]
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            h = self._rms_norm(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(n, self.num_heads, self.head_dim)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(n, self.num_kv_heads,
                                                                   self.head_dim)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(n, self.num_kv_heads,
                                                                   self.head_dim)
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)

            cache = self.kv_tensors[layer]
            # cache[blk, 0, :, off] has shape [n, kv_heads, head_dim].
            cache[blk, 0, :, off] = k.to(self.kv_dtype)
            cache[blk, 1, :, off] = v.to(self.kv_dtype)
            # Read the whole sequence back from the cache - also the tokens just
            # written - so attention sees exactly the stored (possibly pulled)
            # bytes, the same way on every engine.
            keys, values = self._gather(cache, table, total)
            attn = self._attention(q, keys, values, mask)
            x = x + attn @ self.w[p + "self_attn.o_proj.weight"].T

            h = self._rms_norm(x, self.w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ self.w[p + "mlp.gate_proj.weight"].T)
            up = h @ self.w[p + "mlp.up_proj.weight"].T
            x = x + (gate * up) @ self.w[p + "mlp.down_proj.weight"].T

        self.seq_lens[request_id] = total
        last = self._rms_norm(x[-1:], self.w["model.norm.weight"])
        return (last @ self.w["lm_head.weight"].T)[0]

    def _gather(self, cache: torch.Tensor, table: list[int],
                total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first ``total`` tokens: ``[kv_heads, total, head_dim]`` each."""
        used = cache[torch.tensor(table[:self.blocks_needed(total)])].float()
        # [blocks, 2, kv_heads, block_size, dim] -> [2, kv_heads, blocks * block_size, dim]
        seq = used.permute(1, 2, 0, 3, 4).reshape(2, self.num_kv_heads, -1, self.head_dim)
        return seq[0, :, :total], seq[1, :, :total]

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """GQA: each KV head serves ``num_heads / num_kv_heads`` query heads."""
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=0)        # [heads, total, dim]
        values = values.repeat_interleave(group, dim=0)
        q = q.transpose(0, 1)                               # [heads, n, dim]
        scores = (q @ keys.transpose(1, 2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ values        # [heads, n, dim]
        return out.transpose(0, 1).reshape(q.shape[1], self.num_heads * self.head_dim)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)            # [n, head_dim]
        return emb.cos()[:, None, :], emb.sin()[:, None, :]

    def generate(self, request_id: str, prompt_ids: Sequence[int], n: int) -> list[int]:
        """Prefill + greedy decode in this engine alone: ``n`` new tokens. The
        single-process reference a transferred continuation must equal."""
        first = self.prefill(request_id, prompt_ids)
        try:
            return [first, *self.decode(request_id, first, n - 1)] if n > 0 else []
        finally:
            self.free(request_id)

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        """The model's tokenizer, loaded on first use (only the front end needs
        it; the engine itself works on token ids)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """BOS + the tokenized text, as Llama models expect."""
        bos = self.tokenizer.bos_token_id
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([bos] if bos is not None else []) + list(ids)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each half-split pair of ``x`` [n, heads, dim] (Llama's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
