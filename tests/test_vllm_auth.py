# SPDX-License-Identifier: Apache-2.0
"""The shared secret through the whole stack: a vLLM decode engine without the
producer's secret is refused at the handshake with an error naming auth, and
never served a byte; with it, the pair works."""

from __future__ import annotations

import pytest

from helpers.procs import Engine, stop_engines
from kvbridge.serve.launch import free_port
from test_vllm_connector import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.vllm

SECRET = "kvbridge-test-secret"


def test_consumer_without_the_secret_is_refused_naming_auth(tiny_model_dir):
    def engine(role, **extra):
        # Not waited for: the four engines start together.
        return Engine(role, tiny_model_dir, port=free_port(), wait=False,
                      extra={"transport": "tcp", **extra})

    engines = []
    try:
        p = engine("kv_producer", secret=SECRET)
        engines.append(p)
        without, wrong, right = (engine("kv_consumer"), engine("kv_consumer", secret="wrong"),
                                 engine("kv_consumer", secret=SECRET))
        engines += [without, wrong, right]
        # No secret: refused at the handshake, the consumer's log says why.
        params = p.call(cmd="prefill", prompts=[PROMPTS[0]])["params"]
        out = without.call(cmd="decode", prompts=[PROMPTS[0]], params=params,
                           max_tokens=MAX_TOKENS)
        assert out["tokens"] in ([], [[]]), out
        assert "producer requires a shared secret and none is configured" in without.logs()
        m = p.call(cmd="transport")["metrics"]
        assert m["pulls_served"] == 0 and m["bytes_served"] == 0
        without.stop()
        # A wrong secret: refused the same way, and the producer says why.
        params = p.call(cmd="prefill", prompts=[PROMPTS[1]])["params"]
        out = wrong.call(cmd="decode", prompts=[PROMPTS[1]], params=params,
                         max_tokens=MAX_TOKENS)
        assert out["tokens"] in ([], [[]]), out
        assert "authentication failed" in wrong.logs()
        assert p.call(cmd="transport")["metrics"]["refusals"][-1] == "authentication failed"
        wrong.stop()
        # The right secret: served.
        params = p.call(cmd="prefill", prompts=[PROMPTS[1]])["params"]
        out = right.call(cmd="decode", prompts=[PROMPTS[1]], params=params,
                         max_tokens=MAX_TOKENS)
        assert out["finish"] == ["length"], right.logs()[-2000:]
        assert out["metrics"]["local_compute"] == 0
    finally:
        stop_engines(engines)
