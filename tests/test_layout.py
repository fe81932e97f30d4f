# SPDX-License-Identifier: Apache-2.0
"""The layout contract: every differing field is named with both values."""

import msgspec
import pytest
import torch

from kvbridge.layout import (
    PROTOCOL_VERSION,
    KVLayout,
    LayoutMismatchError,
    check_compatible,
)

BASE = dict(model="tiny-llama", model_dtype="bfloat16", kv_cache_dtype="bfloat16", num_layers=2,
            num_kv_heads=2, kv_heads_per_rank=2, head_size=64, block_size=128,
            memory_layout="LBHNC", regions_per_layer=1, block_bytes=65536, tp_size=1, tp_rank=0)

# One differing value per field of the descriptor.
OTHER = dict(model="other-model", model_dtype="float32", kv_cache_dtype="float32", num_layers=4,
             num_kv_heads=8, kv_heads_per_rank=1, head_size=128, block_size=64,
             memory_layout="LBNHC", regions_per_layer=2, block_bytes=32768, tp_size=2, tp_rank=1,
             kv_lora_rank=512, rope_head_dim=64,
             kv_cache_groups=("SlidingWindowSpec(window=64) x 2 layers",
                              "FullAttentionSpec x 2 layers"),
             protocol_version=PROTOCOL_VERSION + 1)


def test_every_field_is_covered_by_this_test():
    assert set(OTHER) == set(KVLayout.__struct_fields__)


@pytest.mark.parametrize("field", sorted(OTHER))
def test_each_differing_field_is_named_with_both_values(field):
    local = KVLayout(**BASE)
    remote_fields = dict(BASE, **{field: OTHER[field]})
    if field == "tp_rank":
        remote_fields["tp_size"] = 2  # a valid rank needs a bigger world
    remote = KVLayout(**remote_fields)
    with pytest.raises(LayoutMismatchError) as err:
        check_compatible(local, remote)
    msg = str(err.value)
    assert f"{field}: local {getattr(local, field)}, remote {getattr(remote, field)}" in msg
    assert (field, getattr(local, field), getattr(remote, field)) in err.value.differences


def test_all_differences_in_one_error():
    local = KVLayout(**BASE)
    remote = KVLayout(**dict(BASE, block_size=64, kv_cache_dtype="float32", model_dtype="float32"))
    with pytest.raises(LayoutMismatchError) as err:
        check_compatible(local, remote)
    assert str(err.value) == ("KV layout mismatch: model_dtype: local bfloat16, remote float32; "
                              "kv_cache_dtype: local bfloat16, remote float32; "
                              "block_size: local 128, remote 64")


def test_equal_layouts_pass_and_fingerprints_agree():
    a, b = KVLayout(**BASE), KVLayout(**BASE)
    check_compatible(a, b)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    assert KVLayout(**dict(BASE, block_size=64)).fingerprint() != a.fingerprint()


def test_serialization_round_trip():
    a = KVLayout(**BASE)
    assert KVLayout.from_json(a.to_json()) == a
    assert KVLayout.from_dict(a.to_dict()) == a
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=KVLayout) == a


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(num_layers=-1), dict(tp_rank=1),
                                 dict(memory_layout="XYZ"), dict(head_size="64")])
def test_invalid_descriptor_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        KVLayout(**dict(BASE, **bad))


def test_decoding_rejects_wrong_types():
    data = KVLayout(**BASE).to_dict()
    data["block_size"] = "128"
    with pytest.raises(msgspec.ValidationError):
        KVLayout.from_dict(data)


def test_from_plain_tensors_matches_vllm_cpu_shape():
    regions = [torch.zeros(10, 2, 128, 128, dtype=torch.bfloat16) for _ in range(2)]
    layout = KVLayout.from_tensors(regions, model="tiny-llama", block_size=128, num_kv_heads=2,
                                   head_size=64, memory_layout="HND")
    assert layout == KVLayout(**BASE)


def test_from_tensors_refuses_unlike_tensors():
    regions = [torch.zeros(10, 2, 128, 128, dtype=torch.bfloat16),
               torch.zeros(10, 2, 64, 128, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="all regions must be alike"):
        KVLayout.from_tensors(regions, model="m", block_size=128, num_kv_heads=2, head_size=64)
