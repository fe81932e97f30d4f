# SPDX-License-Identifier: Apache-2.0
"""Streamed requests end to end: ``kvbridge proxy --kv-mode stream`` in front
of real vLLM API servers with KVBridgeConnector.

The proxy sends each request to prefill and decode at once; decode allocates
its blocks and asks for the KV by position while prefill still computes it
(the prefill server is chunked to one block per step, so its blocks are
published over several steps), and pulls them in chunks of two blocks. The
colocated reference is the decode server answering alone."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from helpers.procs import Proxy
from helpers.relay import HeldRelay
from kvbridge.serve.launch import free_port, kv_transfer_config, start_server, stop_all, wait_healthy

pytestmark = pytest.mark.vllm
MODEL = "tiny"
#: ~520 tokens: five 128-token blocks, the last one partial
PROMPT = ("The socket module provides access to the BSD socket interface; it is available "
          "on all modern Unix systems, and its functions mirror the system calls. ") * 16


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    p = start_server("prefill", tiny_model_dir, free_port(), cpu_core=0, log_dir=logs,
                     served_name=MODEL, extra_args=["--max-num-batched-tokens", "128"],
                     kv_config=kv_transfer_config("kv_producer", kv_port=free_port()))
    # No prefix cache on decode: its colocated reference run would hold the
    # prompt's blocks, and the streamed run pull only the last one.
    d = start_server("decode", tiny_model_dir, free_port(), cpu_core=1, log_dir=logs,
                     served_name=MODEL, extra_args=["--no-enable-prefix-caching"],
                     kv_config=kv_transfer_config(
                         "kv_consumer", kv_port=free_port(), policy="recompute",
                         extra={"stream_chunk_blocks": 2, "transfer_timeout_s": 4}))
    try:
        wait_healthy([p, d])
        yield p, d, logs
    finally:
        stop_all([p, d])


@pytest.fixture(scope="module")
def proxy(servers):
    p, d, logs = servers
    px = Proxy([p.url], [d.url], "--kv-mode", "stream", "--request-log",
               str(logs / "proxy-requests.jsonl"), log_dir=logs)
    yield px
    px.stop()


def metric_sum(url: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sources(d) -> dict:
    return {s: metric_sum(d.url, "vllm:prompt_tokens_by_source_total", f'source="{s}"')
            for s in ("local_compute", "external_kv_transfer")}


def body(stream: bool = False, max_tokens: int = 16) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


@pytest.fixture(scope="module")
def colocated(servers):
    _, d, _ = servers
    r = httpx.post(d.url + "/v1/completions", json=body(), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_streamed_request_is_token_identical_and_decode_computes_no_prompt_token(
        servers, proxy, colocated):
    p, d, _ = servers
    before = sources(d)
    publishes = metric_sum(p.url, "vllm:kvbridge_stream_publishes_total")
    r = httpx.post(proxy.url + "/v1/completions", json=body(), timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-kvbridge-mode"] == "streamed"
    out = r.json()
    assert out["choices"][0]["text"] == colocated
    after = sources(d)
    assert after["local_compute"] == before["local_compute"], (before, after)
    prompt_tokens = out["usage"]["prompt_tokens"]
    assert prompt_tokens > 4 * 128
    assert after["external_kv_transfer"] - before["external_kv_transfer"] == prompt_tokens
    # Every block moved, in chunks of two: three pulls of five blocks.
    assert out["kv_transfer_params"]["kvbridge_kv_blocks"] == 5
    # Prefill published them step by step: 128 tokens a step, five steps.
    assert metric_sum(p.url, "vllm:kvbridge_stream_publishes_total") - publishes == 5


def test_streamed_sse_answer_is_token_identical(servers, proxy, colocated):
    _, d, _ = servers
    before = sources(d)
    parts = []
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body(stream=True),
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if event.get("choices"):
                    parts.append(event["choices"][0].get("text") or "")
    assert "".join(parts) == colocated
    assert sources(d)["local_compute"] == before["local_compute"]
    # The proxy timed it: its prefill answered in the background, decode's
    # first token came after that prefill's KV - one line, one hop observed.
    # The line is written at the later of the two events, and a streamed
    # prefill's answer may come after decode's last chunk reached us: wait.
    _, _, logs = servers
    deadline = time.monotonic() + 60
    while True:
        lines = [json.loads(x)
                 for x in (logs / "proxy-requests.jsonl").read_text().splitlines()]
        streamed = [x for x in lines if x["stream"]]
        if streamed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert streamed and streamed[-1]["mode"] == "streamed", lines
    last = streamed[-1]
    assert last["prefill_ms"] > 0 and last["ttft_ms"] > 0, last
    assert abs(last["ttft_ms"] - last["prefill_ms"] - last["hop_ms"]) < 50, last
    assert metric_sum(proxy.url, "kvbridge_proxy_hop_seconds_count") >= 1


def test_prefill_answering_after_decode_is_still_timed(servers, colocated, tmp_path):
    """A streamed request's prefill may answer after decode's whole answer has
    been sent and the client has gone (CI's loaded machine did so). Decode had
    all the KV by its first token, so the client leaving must not abort that
    prefill: its answer is awaited and the request's hop logged. The prefill
    answers are held back here by a relay in front of the real server."""
    p, d, logs = servers
    relay = HeldRelay(("127.0.0.1", p.port))
    log = tmp_path / "requests.jsonl"
    px = Proxy([relay.url], [d.url], "--kv-mode", "stream", "--request-log", str(log),
               log_dir=logs)
    try:
        deadline = time.monotonic() + 60  # both described: the request will stream
        while httpx.get(px.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the proxy never paired its backends"
            time.sleep(0.2)
        relay.hold()
        with httpx.stream("POST", px.url + "/v1/completions", json=body(stream=True),
                          timeout=120) as r:
            assert r.status_code == 200
            text = "".join(json.loads(x[6:])["choices"][0].get("text") or ""
                           for x in r.iter_lines()
                           if x.startswith("data: ") and x != "data: [DONE]")
        assert text == colocated
        time.sleep(1.0)  # the proxy has seen the client go
        assert log.read_text() == ""  # prefill's answer is still held
        relay.release()
        deadline = time.monotonic() + 30
        while not log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert len(lines) == 1 and lines[0]["mode"] == "streamed" and lines[0]["stream"], lines
        # the prefill answered after decode's first token: a negative hop
        assert lines[0]["hop_ms"] < 0 and lines[0]["prefill_ms"] > 1000, lines
    finally:
        px.stop()
        relay.close()


def test_a_stream_nobody_publishes_fails_the_load_not_the_engine(servers, colocated):
    """Decode told to read a stream its producer never computes: the producer
    refuses the parked pulls at its timeout, the load fails, vLLM recomputes
    (policy ``recompute``) - the answer is still right and both engines live."""
    p, d, _ = servers
    desc = httpx.post(p.url + "/v1/completions", json={
        "model": MODEL, "prompt": "x", "max_tokens": 1,
        "kv_transfer_params": {"kvbridge_describe": True}}, timeout=60).json()
    info = desc["kv_transfer_params"]["kvbridge_describe"]
    from kvbridge.serve.proxy.modes import streamed_kv_params

    _, d_params = streamed_kv_params(info, "kvbs-nobody-computes-this")
    t0 = time.monotonic()
    r = httpx.post(d.url + "/v1/completions", json={**body(), "kv_transfer_params": d_params},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == colocated
    assert time.monotonic() - t0 < 60
    assert metric_sum(d.url, "vllm:kvbridge_failed_transfers_total") >= 1
    assert httpx.get(p.url + "/health").status_code == 200
    assert httpx.get(d.url + "/health").status_code == 200


def test_nixl_push_connector_through_the_proxy(tiny_model_dir, tmp_path):
    """vLLM's own NixlPushConnector behind ``--kv-mode stream``: the first
    request is pulled in sequence (its answer names the prefill instance's
    coordinates), the next ones go to both at once - decode registers its
    blocks and prefill writes into them. Token-identical; decode computes no
    prompt token."""
    import nixl  # noqa: F401 - part of the CI stack: fail, never skip, without it
    from pathlib import Path

    tuning = Path(__file__).resolve().parents[1] / "benchmarks" / "pd_compare" / "nixl_tuning"

    def env():
        return {"UCX_TLS": "self,sm,tcp", "UCX_NET_DEVICES": "lo",
                "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
                "PD_COMPARE_NIXL_PTHR_DELAY_US": "100", "PD_COMPARE_NIXL_KEEP_AFFINITY": "1",
                "PYTHONPATH": str(tuning)}

    def kv(role):
        return {"kv_connector": "NixlPushConnector", "kv_role": role,
                "kv_buffer_device": "cpu"}

    p = start_server("prefill", tiny_model_dir, free_port(), cpu_core=0, log_dir=tmp_path,
                     served_name=MODEL, kv_config=kv("kv_producer"), env=env())
    d = start_server("decode", tiny_model_dir, free_port(), cpu_core=1, log_dir=tmp_path,
                     served_name=MODEL, kv_config=kv("kv_consumer"), env=env(),
                     extra_args=["--no-enable-prefix-caching"])
    px = None
    try:
        wait_healthy([p, d])
        want = httpx.post(d.url + "/v1/completions", json=body(), timeout=120).json()
        px = Proxy([p.url], [d.url], "--kv-mode", "stream", log_dir=tmp_path)
        modes = []
        for _ in range(2):
            before = sources(d)
            r = httpx.post(px.url + "/v1/completions", json=body(), timeout=120)
            assert r.status_code == 200, r.text
            modes.append(r.headers["x-kvbridge-mode"])
            assert r.json()["choices"][0]["text"] == want["choices"][0]["text"]
            after = sources(d)
            assert after["local_compute"] == before["local_compute"], (before, after)
            assert after["external_kv_transfer"] - before["external_kv_transfer"] == \
                r.json()["usage"]["prompt_tokens"]
        assert modes == ["disaggregated", "streamed"]
    finally:
        if px is not None:
            px.stop()
        stop_all([p, d])
