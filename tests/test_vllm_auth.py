# SPDX-License-Identifier: Apache-2.0
"""The shared secret through the whole stack: a vLLM decode engine without the
producer's secret is refused at the handshake with an error naming auth, and
never served a byte; with it, the pair works."""

from __future__ import annotations

import pytest

from helpers.procs import Engine
from kvbridge.serve.launch import free_port
from test_vllm_connector import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.vllm

SECRET = "kvbridge-test-secret"


def test_consumer_without_the_secret_is_refused_naming_auth(tiny_model_dir):
    p = Engine("kv_producer", tiny_model_dir, port=free_port(),
               extra={"transport": "tcp", "secret": SECRET})
    engines = [p]
    try:
        params = p.call(cmd="prefill", prompts=[PROMPTS[0]])["params"]
        d = Engine("kv_consumer", tiny_model_dir, port=free_port(), extra={"transport": "tcp"})
        engines.append(d)
        out = d.call(cmd="decode", prompts=[PROMPTS[0]], params=params, max_tokens=MAX_TOKENS)
        assert out["tokens"] in ([], [[]]), out
        assert "producer requires a shared secret and none is configured" in d.logs()
        m = p.call(cmd="transport")["metrics"]
        assert m["pulls_served"] == 0 and m["bytes_served"] == 0
        d.stop()
        # A wrong secret: refused the same way, and the producer says why.
        d = Engine("kv_consumer", tiny_model_dir, port=free_port(),
                   extra={"transport": "tcp", "secret": "wrong"})
        engines.append(d)
        params = p.call(cmd="prefill", prompts=[PROMPTS[1]])["params"]
        out = d.call(cmd="decode", prompts=[PROMPTS[1]], params=params, max_tokens=MAX_TOKENS)
        assert out["tokens"] in ([], [[]]), out
        assert "authentication failed" in d.logs()
        assert p.call(cmd="transport")["metrics"]["refusals"][-1] == "authentication failed"
        d.stop()
        # The right secret: served.
        d = Engine("kv_consumer", tiny_model_dir, port=free_port(),
                   extra={"transport": "tcp", "secret": SECRET})
        engines.append(d)
        params = p.call(cmd="prefill", prompts=[PROMPTS[1]])["params"]
        out = d.call(cmd="decode", prompts=[PROMPTS[1]], params=params, max_tokens=MAX_TOKENS)
        assert out["finish"] == ["length"], d.logs()[-2000:]
        assert out["metrics"]["local_compute"] == 0
    finally:
        for e in engines:
            e.stop()
