# SPDX-License-Identifier: Apache-2.0
"""Real deployment shapes behind real API servers: equal and mixed tensor
parallelism, Qwen3, and Gemma-3's hybrid KV cache (sliding-window + full).

Each shape's servers start once per module and serve every prompt of it (the
suite must stay under 30 minutes). The test plays the router: prompt to the
producer with ``do_remote_decode`` and ``max_tokens=1``, its
``kv_transfer_params`` forwarded unchanged to the consumer. Every decode
answer must equal the colocated answer of the same model, and the consumer
must compute no prompt token (vLLM's ``prompt_tokens_by_source`` counters).

The TP servers are ``kv_both``, so three of them give every direction:
TP1 -> TP2, TP2 -> TP1 and TP2 -> TP2. Prefix caching is off so a server's
own earlier prompts never stand in for a transfer.
"""

from __future__ import annotations

import time

import httpx
import pytest
import test_vllm_servers as S

from kvbridge.demo import tiny_model
from kvbridge.serve.launch import (
    free_port,
    free_port_block,
    kv_transfer_config,
    start_server,
    stop_all,
    wait_healthy,
)

pytestmark = pytest.mark.vllm

BLOCK = 32
#: one prompt shorter than a block, one not a multiple of the block size
PROMPTS = {
    "short": "The socket module provides access to the BSD socket interface.",
    "long": ("Return a new list containing all items from the iterable in ascending order; "
             "a custom key function can be supplied to customise the sort order. ") * 5
            + "The reverse flag can be set to request the result in descending order.",
}
MAX_TOKENS = 12
#: the first P/D answer after the servers are ready: seconds, not a timeout
FIRST_ANSWER_S = 30


def _server(name, model, tmp, *, tp=1, role="kv_both", transport="tcp", core=None,
            policy="fail", kv_extra=None):
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else str(core or 0),
           "OMP_WAIT_POLICY": "PASSIVE"}
    args = ["--no-enable-prefix-caching"] + (["--tensor-parallel-size", "2"] if tp == 2 else [])
    return start_server(name, model, free_port(), block_size=BLOCK, log_dir=tmp,
                        served_name="tiny", extra_args=args, env=env,
                        kv_config=kv_transfer_config(role, transport=transport, policy=policy,
                                                     kv_port=free_port_block(tp),
                                                     extra=kv_extra))


def _text(server, prompt, max_tokens=MAX_TOKENS, params=None):
    return S.complete(server.url, "tiny", prompt, max_tokens, params)


def pd_exchange(prefill, decode, prompt):
    """Route one prompt through the pair; returns (decode response, prompt
    tokens computed on decode by source: the delta this request made)."""
    before = S.prompt_sources(decode.url)
    p = _text(prefill, prompt, 1, {"do_remote_decode": True})
    params = p["kv_transfer_params"]
    assert params and params.get("kvbridge"), p
    d = _text(decode, prompt, MAX_TOKENS, params)
    after = S.prompt_sources(decode.url)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return d, delta


def check_pair(prefill, decode, reference: dict[str, str]) -> list[float]:
    """Every prompt through prefill -> decode: identical text, no prompt token
    computed on decode. Returns the seconds each exchange took."""
    took = []
    for name, prompt in PROMPTS.items():
        t0 = time.monotonic()
        d, delta = pd_exchange(prefill, decode, prompt)
        took.append(time.monotonic() - t0)
        tokens = d["usage"]["prompt_tokens"]
        assert d["choices"][0]["text"] == reference[name], (name, prefill.name, decode.name)
        assert delta.get("local_compute", 0) == 0, (name, delta)
        assert delta.get("external_kv_transfer", 0) == tokens, (name, delta, tokens)
    return took


def _reference(server) -> dict[str, str]:
    return {name: _text(server, prompt)["choices"][0]["text"] for name, prompt in PROMPTS.items()}


def test_prompts_cover_the_block_edge_cases(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    lens = {n: len(tok(p)["input_ids"]) for n, p in PROMPTS.items()}
    assert lens["short"] < BLOCK and lens["long"] > BLOCK and lens["long"] % BLOCK, lens


# ---------------------------------------------------------------- tensor parallelism
class TPServers:
    """The TP servers of one transport, started as the directions need them
    and never more than two at once: two TP-2 engines and a TP-1 one would
    be five busy workers on this 2-core machine, where TP-2 workers starve."""

    def __init__(self, model, tmp, transport):
        self.model, self.tmp, self.transport = model, tmp, transport
        self.up: dict = {}
        self.reference: dict[str, str] | None = None

    def get(self, *names):
        for name in [n for n in self.up if n not in names]:
            stop_all([self.up.pop(name)])
        new = [n for n in names if n not in self.up]
        for name in new:
            self.up[name] = _server(name, self.model, self.tmp, transport=self.transport,
                                    tp=1 if name == "tp1" else 2, core=0)
        wait_healthy([self.up[n] for n in new], timeout_s=420)
        for name in new:
            # An engine's first forward pass sets up its kernels (and a TP-2
            # engine its all-reduce): seconds to half a minute on this loaded
            # CPU. Spent here, so the first P/D exchange times the transfer.
            _text(self.up[name], PROMPTS["short"], 2)
        if self.reference is None:
            # The colocated answer (TP 1 and TP 2 answer the same).
            self.reference = _reference(self.up[names[0]])
        return [self.up[n] for n in names]

    def close(self):
        stop_all(list(self.up.values()))


@pytest.fixture(scope="module")
def tp_servers(request, tiny_model_dir, tmp_path_factory):
    """The TP servers of the medium the test names (indirect parameter)."""
    servers = TPServers(tiny_model_dir, tmp_path_factory.mktemp(f"tp-{request.param}"),
                        request.param)
    try:
        yield servers
    finally:
        servers.close()


def check_tp_pair(tp_servers, direction):
    prefill, decode = tp_servers.get(*direction.split("->"))
    took = check_pair(prefill, decode, tp_servers.reference)
    print(f"{tp_servers.transport} {direction}: exchanges took {[round(t, 2) for t in took]} s")
    # No handshake waits out a timeout: the first exchange takes seconds.
    assert took[0] < FIRST_ANSWER_S, took
    for s in (prefill, decode):
        log = s.log_path.read_text(errors="replace")
        assert "EngineDeadError" not in log and "refusing consumer" not in log, s.name


# Mixed TP over tcp, equal TP over cma: each medium under vLLM with TP ranks
# (each medium's reads per rank are covered at every TP pairing by
# test_transport's test_mixed_tp_reads_each_ranks_heads), with one TP-2
# engine start fewer per medium than running every direction on both.
# In this order the second direction reuses the first one's servers.
@pytest.mark.parametrize("tp_servers", ["tcp"], indirect=True)
@pytest.mark.parametrize("direction", ["tp1->tp2a", "tp2a->tp1"])
def test_mixed_tp_pair_token_identical(tp_servers, direction):
    check_tp_pair(tp_servers, direction)


@pytest.mark.parametrize("tp_servers", ["cma"], indirect=True)
def test_equal_tp_pair_token_identical(tp_servers):
    check_tp_pair(tp_servers, "tp2a->tp2b")


# ---------------------------------------------------------------- other models
@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def model_pair(request, tmp_path_factory):
    arch = request.param
    model = tiny_model.ensure(tiny_model.default_path(arch=arch), arch=arch)
    tmp = tmp_path_factory.mktemp(arch)
    prefill = _server("prefill", model, tmp, role="kv_producer", core=0)
    decode = _server("decode", model, tmp, role="kv_consumer", core=1)
    try:
        wait_healthy([prefill, decode], timeout_s=300)
        yield arch, prefill, decode, _reference(decode)
    finally:
        stop_all([prefill, decode])


def test_model_pair_token_identical(model_pair):
    arch, prefill, decode, reference = model_pair
    check_pair(prefill, decode, reference)
    log = decode.log_path.read_text(errors="replace")
    assert "Turning off hybrid kv cache manager" not in log


@pytest.mark.parametrize("model_pair", ["gemma3"], indirect=True)
def test_gemma3_sliding_window_moves_only_its_window(model_pair):
    arch, prefill, decode, _ = model_pair
    window = tiny_model.GEMMA3_CONFIG["sliding_window"]
    # A prompt spanning several windows: the sliding-window group keeps only
    # the blocks its window still covers, the full-attention group all.
    prompt = PROMPTS["long"] * 2
    d, delta = pd_exchange(prefill, decode, prompt)
    assert delta.get("local_compute", 0) == 0, delta
    per_group = d["kv_transfer_params"]["kvbridge_kv_blocks_by_group"]
    tokens = d["usage"]["prompt_tokens"]
    print(f"gemma3: {tokens} prompt tokens, blocks pulled per KV cache group {per_group}")
    assert len(per_group) == 2, per_group
    full, sliding = max(per_group), min(per_group)
    assert full == -(-tokens // BLOCK), (per_group, tokens)
    assert sliding <= -(-window // BLOCK) + 1 < full, (per_group, window)
    # And the answer is still right.
    assert d["choices"][0]["text"] == _text(decode, prompt)["choices"][0]["text"]
    for s in (prefill, decode):
        assert "Turning off hybrid kv cache manager" not in s.log_path.read_text(errors="replace")
    assert httpx.get(decode.url + "/health", timeout=10).status_code == 200


# With the tcp TP servers above: their TP-2 engine is the producer.
@pytest.mark.parametrize("tp_servers", ["tcp"], indirect=True)
def test_tp2_to_tp1_a_corrupted_rank_read_is_never_garbage(tp_servers, tiny_model_dir, tmp_path):
    """Decode TP 1 gathers each block from two producer ranks; every second
    read lands with a flipped byte. The checksums name the corrupted blocks,
    vLLM recomputes from there (``recompute``), and the answer is still the
    colocated one - never half a request's KV taken as good."""
    prefill, = tp_servers.get("tp2a")
    decode = _server("decode", tiny_model_dir, tmp_path, role="kv_consumer", core=0,
                     policy="recompute", kv_extra={"fault_flip_byte_every": 2})
    try:
        wait_healthy([decode], timeout_s=420)
        want = _text(decode, PROMPTS["long"])["choices"][0]["text"]
        d, delta = pd_exchange(prefill, decode, PROMPTS["long"])
        assert d["choices"][0]["text"] == want
        # One of the two rank reads was corrupted: its blocks were recomputed.
        assert delta.get("local_compute", 0) > 0, delta
        log = decode.log_path.read_text(errors="replace")
        assert "checksum mismatch" in log and "EngineDeadError" not in log
        assert httpx.get(decode.url + "/health", timeout=10).status_code == 200
    finally:
        stop_all([decode])


def test_gemma3_failed_load_is_reported_by_request(tmp_path):
    """Several KV cache groups: block ids are unique per group only, so vLLM
    takes a failed load by request (``failed_recving``), never by block id
    (which would kill its engine). Every pull lands corrupted here; under
    ``recompute`` the decode computes the whole prompt itself and answers
    right, and the engine keeps serving."""
    model = tiny_model.ensure(tiny_model.default_path(arch="gemma3"), arch="gemma3")
    prefill = _server("prefill", model, tmp_path, role="kv_producer", core=0)
    decode = _server("decode", model, tmp_path, role="kv_consumer", core=1,
                     policy="recompute", kv_extra={"fault_flip_byte_every": 1})
    try:
        wait_healthy([prefill, decode], timeout_s=300)
        want = _text(decode, PROMPTS["long"])["choices"][0]["text"]
        d, delta = pd_exchange(prefill, decode, PROMPTS["long"])
        assert d["choices"][0]["text"] == want
        assert delta.get("local_compute", 0) == d["usage"]["prompt_tokens"], delta
        log = decode.log_path.read_text(errors="replace")
        assert "checksum mismatch" in log
        assert "EngineDeadError" not in log and "block-level load failures" not in log
        assert _text(decode, PROMPTS["short"])["choices"]
    finally:
        stop_all([prefill, decode])
