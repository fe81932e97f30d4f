# SPDX-License-Identifier: Apache-2.0
"""``kv_connector_extra_config`` parsing: defaults, and a clear refusal of
every bad value before the engine starts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvbridge.vllm.config import KVBridgeConfig


def parse(extra: dict | None = None, role: str = "kv_consumer") -> KVBridgeConfig:
    ktc = SimpleNamespace(kv_connector="KVBridgeConnector", kv_role=role, kv_port=14579,
                          kv_connector_extra_config=extra)
    return KVBridgeConfig.from_vllm(SimpleNamespace(kv_transfer_config=ktc))


def test_defaults():
    cfg = parse()
    assert (cfg.transport, cfg.base_port, cfg.host_staging) == ("auto", 14579, "auto")
    assert (cfg.step_yield_s, cfg.idle_wait_s) == (0.002, 0.020)
    assert parse({"idle_wait_ms": 0, "step_yield_ms": 5}).idle_wait_s == 0
    assert parse({"idle_wait_ms": "7.5"}).idle_wait_s == pytest.approx(0.0075)
    assert cfg.transport_config.huge_pages == "collapse"
    assert parse({"huge_pages": "OFF"}).transport_config.huge_pages == "off"


@pytest.mark.parametrize("key", ["idle_wait_ms", "step_yield_ms"])
@pytest.mark.parametrize("value", [-1, 101, "soon", None, float("nan")])
def test_step_waits_out_of_range_are_refused(key, value):
    with pytest.raises(ValueError, match=rf"{key} must be a number of milliseconds in \[0, 100\]"):
        parse({key: value})


@pytest.mark.parametrize("extra,message", [
    ({"transprot": "tcp"}, "unknown kv_connector_extra_config keys for KVBridgeConnector: "
                           "['transprot']"),
    ({"host_staging": "maybe"}, "host_staging must be auto, true or false, got 'maybe'"),
    ({"transport": "carrier-pigeon"}, "carrier-pigeon"),
    ({"huge_pages": "sometimes"}, "huge_pages must be one of collapse, advise, off, "
                                  "got 'sometimes'"),
])
def test_bad_values_are_named(extra, message):
    with pytest.raises(ValueError) as e:
        parse(extra)
    assert message in str(e.value)
