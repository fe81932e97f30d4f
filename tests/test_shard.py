# SPDX-License-Identifier: Apache-2.0
"""TP sharding plans: which producer rank's bytes each consumer rank reads."""

import pytest

from kvbridge.layout import KVLayout, LayoutMismatchError, check_pairable
from kvbridge.cache.shard import BlockSlice, paired_slices, plan_reads, rank_heads, unread_ranks


def layout(tp, rank, heads=4, memory_layout="LBHNC", block_size=32, head_size=16, **kw):
    per_rank = max(1, heads // tp)
    return KVLayout(model="m", model_dtype="bfloat16", kv_cache_dtype="bfloat16", num_layers=2,
                    num_kv_heads=heads, kv_heads_per_rank=per_rank, head_size=head_size,
                    block_size=block_size, memory_layout=memory_layout,
                    block_bytes=per_rank * block_size * 2 * head_size * 2, tp_size=tp,
                    tp_rank=rank, **kw)


def heads_read(tp_cons, tp_prod, heads, memory_layout="LBHNC"):
    """For every consumer rank: the model heads its plan fills, in order."""
    out = []
    for rank in range(tp_cons):
        got = []
        for read in plan_reads(layout(tp_cons, rank, heads, memory_layout), tp_prod):
            first, count = rank_heads(heads, tp_prod, read.remote_rank)
            prod = layout(tp_prod, read.remote_rank, heads, memory_layout)
            sl = read.remote_slice or BlockSlice.whole(prod.block_bytes, 1 if memory_layout
                                                       == "LBHNC" else prod.block_size)
            per_head = prod.block_bytes // sl.rows // count
            got += list(range(first + sl.offset // per_head,
                              first + (sl.offset + sl.length) // per_head))
        out.append(got)
    return out


@pytest.mark.parametrize("memory_layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("tp_cons,tp_prod,heads", [
    (1, 1, 4), (2, 2, 4), (2, 1, 4), (1, 2, 4), (4, 1, 4), (1, 4, 4), (4, 2, 8), (2, 4, 8),
    (4, 2, 2), (2, 4, 2), (8, 2, 4), (2, 1, 1), (1, 2, 1), (4, 8, 2)])
def test_every_consumer_rank_gets_exactly_its_heads(tp_cons, tp_prod, heads, memory_layout):
    for rank, got in enumerate(heads_read(tp_cons, tp_prod, heads, memory_layout)):
        first, count = rank_heads(heads, tp_cons, rank)
        assert got == list(range(first, first + count)), (rank, got)


def test_readers_and_unread_replicas_are_counted():
    # decode TP 2 reads one TP-1 producer rank twice: it must wait for both.
    assert [r.readers for r in plan_reads(layout(2, 0), 1)] == [2]
    # MLA-like (one replicated head): decode TP 1 reads one of two producer
    # ranks; the other is handed back by decode rank 0, once.
    one = plan_reads(layout(1, 0, heads=1), 2)
    assert [(r.remote_rank, r.remote_slice, r.local_slice) for r in one] == [(0, None, None)]
    assert unread_ranks(layout(1, 0, heads=1), 2) == [1]
    # Replicas spread over consumer ranks: TP 2 over 4 replicated producer ranks.
    assert sorted(r.remote_rank for k in range(2)
                  for r in plan_reads(layout(2, k, heads=1), 4)) == [0, 1]
    assert sorted(p for k in range(2) for p in unread_ranks(layout(2, k, heads=1), 4)) == [2, 3]


def test_slices_pair_run_by_run():
    remote, local = paired_slices(BlockSlice(64, 64, 32), None, 4096, 2048)
    assert (remote.rows, remote.length, local.offset) == (32, 64, 0)
    with pytest.raises(ValueError, match="do not match"):
        paired_slices(BlockSlice(0, 64, 32), BlockSlice(0, 128, 16), 4096, 4096)
    with pytest.raises(ValueError, match="outside"):
        BlockSlice(100, 64, 1).check(128)


def test_pairable_accepts_other_tp_sizes_and_names_what_cannot_be_bridged():
    check_pairable(layout(2, 1), layout(1, 0))
    check_pairable(layout(1, 0), layout(4, 3))
    with pytest.raises(LayoutMismatchError) as err:
        check_pairable(layout(2, 0, memory_layout="custom"), layout(1, 0, memory_layout="custom"))
    msg = str(err.value)
    assert "tp_size: local 2, remote 1" in msg and "custom" in msg
    with pytest.raises(LayoutMismatchError) as err:
        check_pairable(layout(2, 0), layout(1, 0, head_size=32))
    assert "head_size: local 16, remote 32" in str(err.value)
    with pytest.raises(LayoutMismatchError, match="custom memory layout"):
        plan_reads(layout(2, 0, memory_layout="custom"), 1)
    with pytest.raises(LayoutMismatchError) as err:
        check_pairable(layout(1, 0, kv_lora_rank=0), layout(1, 0, kv_lora_rank=512,
                                                            rope_head_dim=64))
    assert "kv_lora_rank: local 0, remote 512" in str(err.value)


def test_a_kv_cache_group_mismatch_is_refused_and_named():
    hybrid = ("SlidingWindowSpec(window=64) x 2 layers", "FullAttentionSpec x 2 layers")
    with pytest.raises(LayoutMismatchError) as err:
        check_pairable(layout(1, 0, kv_cache_groups=hybrid), layout(2, 0))
    assert "kv_cache_groups: local" in str(err.value) and "SlidingWindowSpec" in str(err.value)
