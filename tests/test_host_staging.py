# SPDX-License-Identifier: Apache-2.0
"""Host staging: a host mirror of a device KV cache, block for block.

On a GPU deployment the producer copies a request's blocks device -> mirror
when it publishes them and the consumer copies pulled blocks mirror -> device
before the pull counts as done. Here "device" tensors are host tensors (no
GPU on CI machines): the same code path, with the CPU kernel doing the
copies. ``test_cuda_kernel.py`` runs the CUDA kernel itself on a GPU.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbridge.cache import kernels
from kvbridge.agent import KVAgent
from kvbridge.cache.blocks import PagedKVCache
from kvbridge.cache.mirror import HostMirror, copy_kv_blocks, kv_block_regions
from kvbridge.layout import KVLayout
from kvbridge.transport import TransferState, TransportConfig

PATHS = ["torch"] + (["cpu_kernel"] if kernels.cpu_kernel_available() else [])


def random_caches(shape, layers=3, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        t = torch.empty(shape, dtype=dtype)
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape,
                                                dtype=torch.uint8, generator=g))
        out[f"model.layers.{i}.self_attn.attn"] = t
    return out


# vLLM's CPU layout [blocks, heads, block_size, 2*head] and the GPU backends'
# K/V-split [2, blocks, block_size, heads, head].
SHAPES = {"cpu": (12, 2, 32, 32), "kv_split": (2, 12, 32, 2, 16)}


def test_kv_block_regions_split_k_and_v_only_for_5d_pairs():
    assert len(kv_block_regions(torch.empty(SHAPES["cpu"]))) == 1
    k, v = kv_block_regions(torch.empty(SHAPES["kv_split"]))
    assert k.shape[0] == v.shape[0] == 12


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_copy_kv_blocks_moves_only_the_named_blocks(path, shape, monkeypatch):
    monkeypatch.setenv("KVBRIDGE_KERNEL", path)
    src, dst = random_caches(SHAPES[shape], seed=1), random_caches(SHAPES[shape], seed=2)
    before = {n: t.clone() for n, t in dst.items()}
    src_ids, dst_ids = [7, 2, 11, 3], [0, 10, 4, 3]
    copy_kv_blocks(src, dst, src_ids, dst_ids, "d2h")
    block_dim = 1 if shape == "kv_split" else 0
    for name in src:
        want = before[name].clone()
        want.index_copy_(block_dim, torch.tensor(dst_ids),
                         src[name].index_select(block_dim, torch.tensor(src_ids)))
        assert torch.equal(dst[name].view(torch.uint8), want.view(torch.uint8)), name


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 4), num_blocks=st.integers(1, 20),
       kv_split=st.booleans(), dtype=st.sampled_from([torch.float16, torch.float32]),
       data=st.data())
def test_copy_kv_blocks_matches_torch_on_random_layouts(layers, num_blocks, kv_split, dtype,
                                                         data):
    shape = (2, num_blocks, 16, 2, 8) if kv_split else (num_blocks, 2, 16, 16)
    src = random_caches(shape, layers, dtype, seed=3)
    dst = random_caches(shape, layers, dtype, seed=4)
    n = data.draw(st.integers(0, num_blocks))
    src_ids = data.draw(st.permutations(range(num_blocks)))[:n]
    dst_ids = data.draw(st.permutations(range(num_blocks)))[:n]
    want = {k: v.clone() for k, v in dst.items()}
    dim = 1 if kv_split else 0
    if n:
        for k in want:
            want[k].index_copy_(dim, torch.tensor(dst_ids),
                                src[k].index_select(dim, torch.tensor(src_ids)))
    copy_kv_blocks(src, dst, src_ids, dst_ids)
    for k in dst:
        assert torch.equal(dst[k].view(torch.uint8), want[k].view(torch.uint8))


def test_copy_kv_blocks_refuses_mismatched_inputs():
    a, b = random_caches(SHAPES["cpu"]), random_caches(SHAPES["cpu"], layers=2)
    with pytest.raises(ValueError, match="different layers"):
        copy_kv_blocks(a, b, [1], [1])
    with pytest.raises(ValueError, match="2 source blocks for 1"):
        copy_kv_blocks(a, dict(a), [1, 2], [1])
    small = {k: torch.zeros(12, 2, 16, 32, dtype=torch.bfloat16) for k in a}
    with pytest.raises(ValueError, match="bytes"):
        copy_kv_blocks(a, small, [1], [1])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mirror_round_trip_and_counts(shape):
    device = random_caches(SHAPES[shape], seed=5)
    mirror = HostMirror(device)
    before = {n: t.clone() for n, t in mirror.host_kv_caches.items()}
    mirror.to_host([4, 9])
    for name, t in device.items():
        h = mirror.host_kv_caches[name]
        dim = 1 if shape == "kv_split" else 0

        def blocks(x, ids, dim=dim):  # raw bytes: random bf16 bits include NaNs
            return x.index_select(dim, torch.tensor(ids)).view(torch.uint8)

        assert torch.equal(blocks(h, [4, 9]), blocks(t, [4, 9]))
        others = [b for b in range(12) if b not in (4, 9)]
        assert torch.equal(blocks(h, others), blocks(before[name], others))
    assert (mirror.blocks_to_host, mirror.blocks_to_device) == (2, 0)
    assert mirror.nbytes == sum(t.numel() * t.element_size() for t in device.values())


def _agent_pair(shape, transport="tcp", copy_op=None):
    """A producer and a consumer, each with a host mirror of its 'device' cache."""
    layers, heads, block_size, head = 2, 2, 32, 16
    dev_p = random_caches(shape, layers, seed=7)
    dev_d = {k: torch.zeros_like(v) for k, v in dev_p.items()}
    agents = []
    for dev in (dev_p, dev_d):
        mirror = HostMirror(dev, copy_op=copy_op)
        regions = mirror.host_regions()
        layout = KVLayout.from_tensors(regions, model="m", block_size=block_size,
                                       num_kv_heads=heads, head_size=head,
                                       memory_layout="custom",
                                       regions_per_layer=len(regions) // layers)
        agents.append(KVAgent(PagedKVCache(layout, regions), transport=transport,
                              config=TransportConfig(transfer_timeout_s=5, publish_wait_s=1),
                              host_mirror=mirror))
    agents[0].serve()
    return agents, dev_p, dev_d


@pytest.mark.parametrize("transport", ["tcp", "cma"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_agents_stage_on_publish_and_before_done(transport, shape):
    (prod, cons), dev_p, dev_d = _agent_pair(SHAPES[shape], transport)
    try:
        ids, local = [3, 8, 9], [0, 5, 11]
        # Written after the mirror was made: only the publish's copy carries it over.
        for t in dev_p.values():
            t.view(torch.uint8)[..., :8] = 0x5A
        ticket = prod.publish("req-1", ids)
        handle = cons.pull(ticket, local)
        assert handle.wait(10) and handle.state == TransferState.DONE, handle.error
        dim = 1 if shape == "kv_split" else 0
        for name in dev_p:
            got = dev_d[name].index_select(dim, torch.tensor(local))
            want = dev_p[name].index_select(dim, torch.tensor(ids))
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
            rest = [b for b in range(12) if b not in local]
            assert not dev_d[name].index_select(dim, torch.tensor(rest)).view(torch.uint8).any()
        assert prod.metrics()["host_staging"]["blocks_to_host"] == 3
        assert cons.metrics()["host_staging"]["blocks_to_device"] == 3
        # A second publish of the same request copies nothing again.
        prod.publish("req-1", ids)
        assert prod.metrics()["host_staging"]["blocks_to_host"] == 3
    finally:
        cons.close()
        prod.close()


def test_failed_device_copy_fails_the_pull_and_refuses_the_publish():
    def broken(src, dst, src_ids, dst_ids, direction):
        raise RuntimeError(f"{direction} copy failed (CUDA error: out of memory)")

    (prod, cons), _, _ = _agent_pair(SHAPES["cpu"], copy_op=broken)
    try:
        with pytest.raises(RuntimeError, match="d2h copy failed"):
            prod.publish("req-1", [1, 2])
        assert prod.metrics()["held_requests"] == 0  # nothing held, nothing to leak
        prod.host_mirror.copy_op = copy_kv_blocks
        ticket = prod.publish("req-2", [1, 2])
        handle = cons.pull(ticket, [3, 4])
        assert handle.wait(10)
        assert handle.state == TransferState.FAILED
        assert "h2d copy failed" in handle.error
    finally:
        cons.close()
        prod.close()


def test_agent_refuses_a_cache_that_is_not_the_mirror():
    dev = random_caches(SHAPES["cpu"], layers=2)
    mirror = HostMirror(dev)
    regions = list(dev.values())
    layout = KVLayout.from_tensors(regions, model="m", block_size=32, num_kv_heads=2,
                                   head_size=16, memory_layout="LBHNC")
    with pytest.raises(ValueError, match="host_mirror"):
        KVAgent(PagedKVCache(layout, regions), host_mirror=mirror)


def test_random_ids_round_trip_through_two_mirrors():
    """Many random requests: every block lands where it should, nothing else changes."""
    (prod, cons), dev_p, dev_d = _agent_pair(SHAPES["kv_split"])
    rng = random.Random(0)
    try:
        for i in range(10):
            n = rng.randint(1, 6)
            ids, local = rng.sample(range(12), n), rng.sample(range(12), n)
            before = {k: v.clone() for k, v in dev_d.items()}
            handle = cons.pull(prod.publish(f"r{i}", ids), local)
            assert handle.wait(10) and handle.state == TransferState.DONE, handle.error
            for k in dev_d:
                want = before[k].clone()
                want[:, local] = dev_p[k][:, ids]
                assert torch.equal(dev_d[k].view(torch.uint8), want.view(torch.uint8))
    finally:
        cons.close()
        prod.close()
