# SPDX-License-Identifier: Apache-2.0
"""KVBridgeConnector between two real vLLM CPU engines (separate processes).

Each engine runs in single-process mode (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
inside its own Python process (``helpers/vllm_pd.py``), driven over JSON lines.
Facts are taken from vLLM itself: generated tokens, and its
``prompt_tokens_by_source`` counters for what decode computed vs received.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from helpers.procs import Engine, stop_engines
from kvbridge.protocol import PROTOCOL_VERSION
from kvbridge.serve.launch import free_port

pytestmark = pytest.mark.vllm

BLOCK = 128
# Token lengths: one block and a bit, shorter than a block, several blocks
# with a partial tail, exactly two blocks (checked below with the tokenizer).
PROMPTS = [
    "Return a new list containing all items from the iterable in ascending order. " * 3,
    "The socket module provides access to the BSD socket interface.",
    "Create a new thread pool executor and submit work to it; when the pool is shut "
    "down, pending futures are cancelled and running ones complete. " * 12,
]
MAX_TOKENS = 12
# Fixtures (tests/conftest.py): engines (Engine processes, stopped at teardown).


# One prompt per call, here and in every P/D run compared with it: vLLM's CPU
# kernels are not batch-invariant (the 527-token prompt alone and in a batch
# of three diverge at the 7th generated token), and in a P/D pair when each
# request's KV lands - so which requests share a decode step - is timing.
@pytest.fixture(scope="module")
def colocated(tiny_model_dir):
    e = Engine("colocated", tiny_model_dir, prefix_caching=False)
    try:
        tokens = [e.call(cmd="generate", prompts=[p], max_tokens=MAX_TOKENS)["tokens"][0]
                  for p in PROMPTS]
        e.ask_to_exit()  # it shuts down while the tests run
        yield tokens
    finally:
        e.stop()


@pytest.fixture(scope="module")
def prompt_lens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [len(tok.encode(p, add_special_tokens=True)) for p in PROMPTS]


def pair(engines, model, transport, d_opts=None):
    """A producer and a consumer engine on ``transport``."""
    p = engines("kv_producer", model, port=free_port(), extra={"transport": transport})
    d = engines("kv_consumer", model, port=free_port(), extra={"transport": transport},
                **(d_opts or {}))
    return p, d


def test_prompt_shapes(prompt_lens):
    """The prompts cover what the issue asks: < 1 block, non-multiple, many blocks."""
    assert min(prompt_lens) < BLOCK
    assert any(n > BLOCK and n % BLOCK for n in prompt_lens)
    assert max(prompt_lens) > 3 * BLOCK


def decode_each(d, prompts, params) -> dict:
    """Decode one prompt per call (see ``colocated``); the last call's metrics
    (vLLM's counters are cumulative)."""
    outs = [d.call(cmd="decode", prompts=[q], params=[x], max_tokens=MAX_TOKENS)
            for q, x in zip(prompts, params)]
    return {"tokens": [t for o in outs for t in o["tokens"]],
            "finish": [f for o in outs for f in o["finish"]], "metrics": outs[-1]["metrics"]}


def check_pair(p, d, colocated, prompt_lens):
    """Decode after a remote prefill: token-identical, no prompt token computed,
    bytes moved == the prompt blocks' KV size, producer blocks freed."""
    # Counters as deltas from here: the pair may be shared (``tcp_pair``) and
    # have served other tests first, in any order.
    free_before = p.call(cmd="free_blocks")["free"]
    m_before = d.call(cmd="metrics")["metrics"]
    t_before = d.call(cmd="transport")["metrics"]
    params = [p.call(cmd="prefill", prompts=[prompt])["params"][0] for prompt in PROMPTS]
    assert all(x["kvbridge"] == PROTOCOL_VERSION and x["remote_num_tokens"] == n
               for x, n in zip(params, prompt_lens))
    out = decode_each(d, PROMPTS, params)
    assert out["finish"] == ["length"] * len(PROMPTS), d.logs()[-3000:]
    assert out["tokens"] == colocated
    # vLLM's own counters: every prompt token arrived by transfer, none computed.
    m = {k: v - m_before.get(k, 0) for k, v in out["metrics"].items()}
    assert m.get("local_compute", 0) == 0, m
    assert m["external_kv_transfer"] == sum(prompt_lens)
    # Bytes moved == KV size of the prompt blocks (partial last blocks whole).
    t = d.call(cmd="transport")
    layout = t["layout"]
    blocks = sum(-(-n // BLOCK) for n in prompt_lens)
    per_block = layout["num_layers"] * layout["regions_per_layer"] * layout["block_bytes"]
    assert t["metrics"]["bytes_pulled"] - t_before["bytes_pulled"] == blocks * per_block
    assert t["metrics"]["transfers_done"] - t_before["transfers_done"] == len(PROMPTS)
    # One handshake per peer, cached. Its time is a benchmark figure (`kvbridge
    # bench transport` prints it); here only a bound far from NixlConnector's
    # ~2 s hot-path handshake, which CI load cannot reach (it took 55 ms once).
    assert t["metrics"]["handshakes"] == 1
    if t["metrics"]["transport"] in ("auto", "tcp", "cma"):
        assert t["metrics"]["handshake_seconds"] < 0.5, t["metrics"]
    # The producer frees every block once read (after its next engine step).
    assert p.call(cmd="step", n=3)["free"] == free_before


@pytest.fixture(scope="module")
def tcp_pair(tiny_model_dir):
    """Shared by the tcp tests. The producer finds the connector by name (entry
    point), the consumer by ``kv_connector_module_path="kvbridge.vllm"``."""
    started = []
    try:
        started.append(Engine("kv_producer", tiny_model_dir, port=free_port(), wait=False,
                              extra={"transport": "tcp"}))
        started.append(Engine("kv_consumer", tiny_model_dir, port=free_port(), wait=False,
                              extra={"transport": "tcp"}, module_path="kvbridge.vllm"))
        yield tuple(started)
    finally:
        stop_engines(started)


def test_tcp_pair_token_identical_both_registrations(tcp_pair, colocated, prompt_lens):
    check_pair(*tcp_pair, colocated, prompt_lens)


@pytest.mark.parametrize("transport", ["cma", "nixl"])
def test_decode_is_token_identical_and_computes_no_prompt_token(engines, tiny_model_dir,
                                                                transport, colocated,
                                                                prompt_lens):
    p, d = pair(engines, tiny_model_dir, transport)
    check_pair(p, d, colocated, prompt_lens)


def test_kv_cache_on_small_pages_goes_onto_huge_pages_while_serving(
        engines, tiny_model_dir, colocated, prompt_lens):
    """vLLM as a user runs it, without THP_MEM_ALLOC_ENABLE: torch puts the KV
    cache on 4 KiB pages and each connector converts it in the background
    (~2.5 s per GiB) from the moment it registers the cache, while the pair
    serves - token-identical, decode computing no prompt token (the bytes
    never change, only the pages behind them)."""
    from kvbridge.cache.hugepages import thp_setting

    env = {"THP_MEM_ALLOC_ENABLE": "0"}
    p = engines("kv_producer", tiny_model_dir, port=free_port(), extra={"transport": "cma"},
                env=env)
    d = engines("kv_consumer", tiny_model_dir, port=free_port(), extra={"transport": "cma"},
                env=env)
    check_pair(p, d, colocated, prompt_lens)
    for e in (p, d):
        deadline = time.monotonic() + 120
        while True:
            hp = e.call(cmd="transport")["metrics"]["huge_pages"]
            if hp["done"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert hp["done"] and hp["mode"] == "collapse", hp
        if thp_setting() in ("always", "madvise"):
            # the engine's one KV allocation (VLLM_CPU_KVCACHE_SPACE=1 GiB), once
            assert hp["error"] is None and hp["converted"] == hp["bytes"] >= 900 << 20, hp
        else:
            assert hp["error"], hp


def test_host_staging_path_token_identical(engines, tiny_model_dir, colocated, prompt_lens):
    """The GPU deployment's path, run on host memory: each engine's KV cache is
    mirrored (host_staging=true), the producer copies blocks cache -> mirror
    when it publishes, the transport moves mirror to mirror, and the consumer
    copies mirror -> cache before vLLM sees the blocks (with the CPU kernel
    standing in for the CUDA one). Skip either copy and decode attends over
    zeros or stale KV, and the tokens differ."""
    staged = {"transport": "tcp", "host_staging": True}
    p = engines("kv_producer", tiny_model_dir, port=free_port(), extra=staged)
    d = engines("kv_consumer", tiny_model_dir, port=free_port(), extra=staged)
    check_pair(p, d, colocated, prompt_lens)
    blocks = sum(-(-n // BLOCK) for n in prompt_lens)
    assert p.call(cmd="transport")["metrics"]["host_staging"]["blocks_to_host"] == blocks
    d_staging = d.call(cmd="transport")["metrics"]["host_staging"]
    assert d_staging["blocks_to_device"] == blocks
    assert d_staging["blocks_to_host"] == 0


def test_prefix_already_cached_on_decode_pulls_only_the_rest(tcp_pair, prompt_lens):
    p, d = tcp_pair
    # Not PROMPTS[2]: another long prompt, so the shared pair's other tests see
    # no prefix hits from this one.
    long_prompt = "Shared system prompt: answer briefly and cite the module name. " * 30
    want = d.call(cmd="generate", prompts=[long_prompt + " tail"], max_tokens=1)["tokens"]
    params = p.call(cmd="prefill", prompts=[long_prompt + " and the question"])["params"]
    before = d.call(cmd="transport")["metrics"]["bytes_pulled"]
    hits_before = d.call(cmd="metrics")["metrics"].get("local_cache_hit", 0)
    out = d.call(cmd="decode", prompts=[long_prompt + " and the question"], params=params,
                 max_tokens=MAX_TOKENS)
    assert out["finish"] == ["length"]
    moved = d.call(cmd="transport")["metrics"]["bytes_pulled"] - before
    layout = d.call(cmd="transport")["layout"]
    per_block = layout["num_layers"] * layout["block_bytes"]
    total_blocks = len(params[0]["remote_block_ids"])
    assert 0 < moved < total_blocks * per_block, "cached prefix blocks were pulled again"
    assert out["metrics"]["local_cache_hit"] > hits_before
    assert want  # the local generation that filled the prefix cache ran
    # Token-identical to the producer answering the same prompt on its own
    # (its KV was computed there, independent of any transfer).
    expect = p.call(cmd="generate", prompts=[long_prompt + " and the question"],
                    max_tokens=MAX_TOKENS)["tokens"]
    assert out["tokens"] == expect


@pytest.mark.parametrize("d_opts,fields", [
    (dict(block_size=64), ["block_size: local 64, remote 128"]),
    (dict(dtype="float32"), ["model_dtype: local float32, remote bfloat16",
                             "kv_cache_dtype: local float32, remote bfloat16"]),
])
def test_mismatched_decode_is_refused_never_garbage(engines, tiny_model_dir, d_opts, fields):
    p, d = pair(engines, tiny_model_dir, "tcp", d_opts=d_opts)
    params = p.call(cmd="prefill", prompts=PROMPTS[:2])["params"]
    t0 = time.monotonic()
    out = d.call(cmd="decode", prompts=PROMPTS[:2], params=params, max_tokens=MAX_TOKENS)
    assert time.monotonic() - t0 < 30
    # kv_load_failure_policy=fail: an error for the client, no tokens at all.
    assert out["tokens"] in ([], [[], []]) and "error" in json.dumps(out["finish"]).lower(), out
    logs = d.logs()
    for f in fields:
        assert f in logs, f"decode log does not name {f!r}"
    # The producer refused before moving a byte.
    assert p.call(cmd="transport")["metrics"]["pulls_served"] == 0


def test_producer_killed_before_pull_fails_fast(engines, tiny_model_dir):
    p, d = pair(engines, tiny_model_dir, "tcp")
    params = p.call(cmd="prefill", prompts=PROMPTS[:1])["params"]
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(10)
    t0 = time.monotonic()
    out = d.call(cmd="decode", prompts=PROMPTS[:1], params=params, max_tokens=MAX_TOKENS)
    assert time.monotonic() - t0 < 20
    assert not out["tokens"] or out["tokens"] == [[]]
    assert "handshake with 127.0.0.1" in d.logs()


def test_producer_killed_with_recompute_policy_still_answers(engines, tiny_model_dir,
                                                             colocated):
    p, d = pair(engines, tiny_model_dir, "tcp", d_opts=dict(policy="recompute"))
    params = [p.call(cmd="prefill", prompts=[q])["params"][0] for q in PROMPTS[:2]]
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(10)
    out = decode_each(d, PROMPTS[:2], params)
    assert out["tokens"] == colocated[:2]
    assert out["metrics"]["local_compute"] > 0  # it recomputed the prompts


def test_lease_frees_blocks_when_decode_never_comes(engines, tiny_model_dir):
    p = engines("kv_producer", tiny_model_dir, port=free_port(),
                extra={"transport": "tcp", "lease_s": 1.0})
    start = p.ready["free"]
    p.call(cmd="prefill", prompts=PROMPTS)
    assert p.call(cmd="free_blocks")["free"] < start
    deadline = time.monotonic() + 20
    free = 0
    while time.monotonic() < deadline and free != start:
        time.sleep(0.5)
        free = p.call(cmd="step", n=2)["free"]
    assert free == start
    assert "expired" in p.logs()


def test_sleep_mode_hooks_let_go_of_the_cache_and_take_it_back(engines, tiny_model_dir,
                                                                colocated):
    """vLLM 0.33's ``unregister_kv_caches`` / ``restore_kv_caches``, called as
    its worker calls them around sleep mode. Unregistered, the producer drops
    what it published (vLLM gets the blocks back) and the consumer fails a
    load whole instead of writing into a cache vLLM is freeing; restored, the
    same pair is token-identical again with no prompt token computed - the
    producer kept its port and identity, which its scheduler advertised."""
    p = engines("kv_producer", tiny_model_dir, port=free_port(),
                extra={"transport": "tcp", "lease_s": 10})
    d = engines("kv_consumer", tiny_model_dir, port=free_port(),
                extra={"transport": "tcp", "publish_wait_s": 2})
    free_at_start = p.ready["free"]
    dropped = p.call(cmd="prefill", prompts=PROMPTS[:1])["params"]
    assert p.call(cmd="free_blocks")["free"] < free_at_start
    p.call(cmd="kv_caches", hook="unregister_kv_caches")
    p.call(cmd="kv_caches", hook="unregister_kv_caches")  # idempotent
    assert p.call(cmd="step", n=2)["free"] == free_at_start
    p.call(cmd="kv_caches", hook="restore_kv_caches")
    p.call(cmd="kv_caches", hook="restore_kv_caches")  # idempotent
    # The dropped request is gone for good: the consumer's load fails cleanly.
    out = d.call(cmd="decode", prompts=PROMPTS[:1], params=dropped, max_tokens=MAX_TOKENS)
    assert out["finish"] == ["error"], out

    # A consumer asleep fails a load whole, before any byte moves.
    params = p.call(cmd="prefill", prompts=PROMPTS[:1])["params"]
    d.call(cmd="kv_caches", hook="unregister_kv_caches")
    out = d.call(cmd="decode", prompts=PROMPTS[:1], params=params, max_tokens=MAX_TOKENS)
    assert out["finish"] == ["error"], out
    assert "the KV cache is unregistered (vLLM sleep mode)" in d.logs()
    d.call(cmd="kv_caches", hook="restore_kv_caches")

    # Both awake again: the pair works as before.
    m_before = d.call(cmd="metrics")["metrics"]
    params = p.call(cmd="prefill", prompts=PROMPTS[:1])["params"]
    out = d.call(cmd="decode", prompts=PROMPTS[:1], params=params, max_tokens=MAX_TOKENS)
    assert out["tokens"] == colocated[:1]
    m = {k: v - m_before.get(k, 0) for k, v in out["metrics"].items()}
    assert m.get("local_compute", 0) == 0 and m["external_kv_transfer"] > 0, m
    # The request the sleeping consumer failed was never read nor handed back
    # (it could not reach the producer): its blocks come back when the lease
    # ends, and then every block is free.
    deadline = time.monotonic() + 40
    while p.call(cmd="step")["free"] != free_at_start and time.monotonic() < deadline:
        time.sleep(0.5)
    assert p.call(cmd="free_blocks")["free"] == free_at_start
