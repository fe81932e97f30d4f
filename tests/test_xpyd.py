# SPDX-License-Identifier: Apache-2.0
"""xPyD: two prefill and two decode vLLM servers (tiny model, TP 1, tcp)
behind ``kvbridge proxy`` and behind ``vllm-router``.

Where network namespaces can be made (root), the prefill pair runs on one
"host", the decode pair on a second and the router (and this test's HTTP
client) on a third, each with its own address on a bridged link: the
producers bind and advertise their namespace address, and nothing relies on
127.0.0.1. Elsewhere all of it runs on loopback.

Every answer equals the colocated one (a decode server answering alone), no
request fails, decode computes no prompt token, both producers give their KV
back (vLLM's KV usage returns to 0), and - behind kvbridge proxy's round
robin - every decode instance pulls from both prefill instances, as its
pairing counter and each answer's ``kvbridge_producers`` show.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter

import httpx
import pytest
from helpers.procs import Proxy, VllmRouter

from kvbridge.bench import netns
from kvbridge.serve.launch import (
    free_port,
    kv_transfer_config,
    start_server,
    stop_all,
    wait_healthy,
)

pytestmark = pytest.mark.vllm
MODEL = "tiny"
#: distinct prompts (no shared prefix), shorter than a block to several blocks
PROMPTS = [f"Request {i}: " + ("the quick brown fox jumps over the lazy dog; " * (1 + 7 * i))
           for i in range(8)]
MAX_TOKENS = 8
#: short enough for the link-fault test to take seconds, not minutes
FAULT_TIMEOUTS = {"transfer_timeout_s": 5, "lease_s": 15}


class Net:
    """Where each role runs: three namespace hosts, or this host's loopback."""

    def __init__(self, hosts):
        self.hosts = hosts

    def place(self, role: str) -> dict:
        if self.hosts is None:
            return {}
        h = self.hosts[{"prefill": 0, "decode": 1, "router": 2}[role]]
        return {"host": h.address, "netns": h.name}

    def call(self, fn, *args, **kw):
        """``fn`` with its sockets on the router's host (the client's place)."""
        return netns.call_in(self.hosts[2].name if self.hosts else None, fn, *args, **kw)


@pytest.fixture(scope="module")
def net():
    if netns.available() is not None:
        yield Net(None)
        return
    with netns.Hosts(3) as hosts:
        yield Net(hosts)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory, net):
    """prefill0/decode0 pinned to core 0, prefill1/decode1 to core 1."""
    logs = tmp_path_factory.mktemp("xpyd")
    servers = []
    kv_addresses = {}  # prefill url -> its kv listener
    # tcp, not the default auto: the "hosts" are network namespaces of one
    # machine (one boot, one PID namespace), where auto rightly reads by cma -
    # past the links these tests throttle and pull.
    transport = "tcp"
    try:
        for i in range(2):
            kv_port = free_port()
            where = net.place("prefill")
            bind = dict(FAULT_TIMEOUTS, **({"host": where["host"]} if where else {}))
            servers.append(start_server(
                f"prefill{i}", tiny_model_dir, free_port(), cpu_core=i, log_dir=logs,
                served_name=MODEL, kv_config=kv_transfer_config("kv_producer", kv_port=kv_port,
                                                                transport=transport,
                                                                extra=bind), **where))
            kv_addresses[servers[-1].url] = f"{where.get('host', '127.0.0.1')}:{kv_port}"
        for i in range(2):
            servers.append(start_server(
                f"decode{i}", tiny_model_dir, free_port(), cpu_core=i, log_dir=logs,
                served_name=MODEL, kv_config=kv_transfer_config("kv_consumer",
                                                                kv_port=free_port(),
                                                                transport=transport,
                                                                extra=FAULT_TIMEOUTS),
                **net.place("decode")))
        wait_healthy(servers, timeout_s=400)
        prefill, decode = servers[:2], servers[2:]
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        want = {}
        for prompt in PROMPTS:  # colocated: a decode server alone, one prompt per call
            r = net.call(httpx.post, decode[0].url + "/v1/completions",
                         json=dict(body, prompt=prompt), timeout=120)
            assert r.status_code == 200, r.text
            want[prompt] = r.json()["choices"][0]["text"]
        yield prefill, decode, want, logs, kv_addresses
    finally:
        stop_all(servers)


def metric_sum(url: str, name: str, label: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        rf'^{re.escape(name)}\{{[^}}]*{re.escape(label)}[^}}]*\}} ([0-9.e+-]+)$', text, re.M))


def computed(url: str) -> float:
    return metric_sum(url, "vllm:prompt_tokens_by_source_total", 'source="local_compute"')


def loaded(url: str) -> float:
    return metric_sum(url, "vllm:prompt_tokens_by_source_total",
                      'source="external_kv_transfer"')


def producers_free(prefill, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        usage = [metric_sum(p.url, "vllm:kv_cache_usage_perc") for p in prefill]
        if all(u == 0 for u in usage):
            return
        time.sleep(0.5)
    raise AssertionError(f"producers still hold KV blocks: usage {usage}")


def ask_each(router_url: str, want: dict, decode, *, until=None,
             max_requests: int = 0) -> list[tuple[str, str]]:
    """Every prompt once, in order - or, with ``until``, the prompts round and
    round until ``until(pairs)`` holds (at most ``max_requests``); returns
    (producer kv address, decode url) per request."""
    pairs = []
    prompts = (PROMPTS if until is None
               else itertools.islice(itertools.cycle(PROMPTS), max_requests))
    for prompt in prompts:
        before = {d.url: (computed(d.url), loaded(d.url)) for d in decode}
        r = httpx.post(router_url + "/v1/completions",
                       json={"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS,
                             "temperature": 0, "ignore_eos": True}, timeout=180)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want[prompt], prompt[:30]
        moved = [d.url for d in decode if loaded(d.url) > before[d.url][1]]
        assert len(moved) == 1, f"expected one decode to load this prompt's KV: {moved}"
        assert all(computed(d.url) == before[d.url][0] for d in decode), \
            "a decode instance computed prompt tokens"
        kvp = r.json().get("kv_transfer_params") or {}
        pairs.append((",".join(kvp.get("kvbridge_producers") or ["?"]), moved[0]))
        if until is not None and until(pairs):
            break
    return pairs


def test_two_prefill_two_decode_behind_kvbridge_proxy(cluster, net):
    prefill, decode, want, logs, kv_of = cluster
    proxy = Proxy([p.url for p in prefill], [d.url for d in decode], "--policy",
                  "round-robin", log_dir=logs, **net.place("router"))
    try:
        pairs = net.call(ask_each, proxy.url, want, decode)
        metrics = net.call(httpx.get, proxy.url + "/metrics").text
    finally:
        proxy.stop()
    print("pairings (producer kv address, decode):", Counter(pairs))
    # Every decode pulled from both producers, and the answers say so too.
    assert {(a, d) for a, d in pairs} == {(kv_of[p.url], d.url) for p in prefill
                                           for d in decode}
    for p in prefill:
        for d in decode:
            assert re.search(rf'^kvbridge_proxy_pairs_total\{{decode="{re.escape(d.url)}",'
                             rf'prefill="{re.escape(p.url)}"\}} 2\.0$', metrics, re.M), metrics
    assert not re.search(r'^kvbridge_proxy_failures_total\{.*\} [1-9]', metrics, re.M)
    net.call(producers_free, prefill)


def test_two_prefill_two_decode_behind_vllm_router(cluster, net):
    prefill, decode, want, logs, kv_of = cluster
    every_pairing = {(kv_of[p.url], d.url) for p in prefill for d in decode}
    # With one round robin on each side vllm-router's two counters move in
    # lockstep (measured: p0 always with d0, p1 with d1). A random decode
    # choice behind a round-robin prefill reaches every pairing: ask until it
    # has (expected within ~6 requests; 32 misses one with p < 1e-4).
    router = VllmRouter([p.url for p in prefill], [d.url for d in decode], logs,
                        "--prefill-policy", "round_robin", "--decode-policy", "random",
                        **net.place("router"))
    try:
        pairs = net.call(ask_each, router.url, want, decode,
                         until=lambda ps: set(ps) >= every_pairing, max_requests=32)
    finally:
        router.stop()
    print(f"pairings behind vllm-router in {len(pairs)} requests (producer kv address, "
          f"decode):", Counter(pairs))
    # Every decode pulled from both producers.
    assert set(pairs) == every_pairing, Counter(pairs)
    net.call(producers_free, prefill)


def test_link_down_mid_transfer_fails_the_request_and_the_engines_live(cluster, net):
    """The prefill host's link throttled, then pulled while a decode is
    loading: that request fails within the transfer timeout with the reason in
    decode's log, the decode engine stays healthy, the producer frees the
    blocks at lease end; with the link back, the next request works."""
    if net.hosts is None:
        pytest.skip(f"needs network namespaces: {netns.available()}")
    prefill, decode, want, logs, kv_of = cluster
    far = net.hosts[0]
    p, d = prefill[0], decode[0]
    prompt = "A long prompt so that its KV takes a while over a slow link. " * 150
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}

    def prefill_params() -> dict:
        r = httpx.post(p.url + "/v1/completions", timeout=120, json=dict(
            body, max_tokens=1, kv_transfer_params={"do_remote_decode": True}))
        assert r.status_code == 200, r.text
        return r.json()["kv_transfer_params"]

    def decode_with(params: dict):
        t0 = time.monotonic()
        r = httpx.post(d.url + "/v1/completions", json=dict(body, kv_transfer_params=params),
                       timeout=120)
        return r, time.monotonic() - t0

    # ~2 MiB of KV through 2 Mbit/s: about 8 s on the wire.
    far.run("tc", "qdisc", "replace", "dev", far.device, "root", "tbf", "rate", "2mbit",
            "burst", "32kb", "latency", "2s")
    try:
        params = net.call(prefill_params)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(net.call, decode_with, params)
            time.sleep(2.0)
            assert not pending.done(), "the transfer finished before the link went down"
            far.link(False)
            t_down = time.monotonic()
            r, _ = pending.result(timeout=120)
            failed_after = time.monotonic() - t_down
        assert r.status_code >= 400, r.text  # kv_load_failure_policy "fail"
        assert failed_after < FAULT_TIMEOUTS["transfer_timeout_s"] + 10, failed_after
        log = d.log_path.read_text(errors="replace")
        assert re.search(r"load of request \S+ failed: \S+: \[(timeout|peer_gone)\]", log), \
            log[-3000:]
        assert net.call(d.healthy), "the decode engine died"
    finally:
        far.link(True)
        far.run("tc", "qdisc", "del", "dev", far.device, "root", check=False)
    # The producer frees what the failed read held (at lease end), and the
    # next request goes through on a fresh connection.
    net.call(producers_free, prefill, timeout_s=FAULT_TIMEOUTS["lease_s"] + 30)
    short = PROMPTS[3]
    r = net.call(httpx.post, d.url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": short, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True, "kv_transfer_params": net.call(lambda: httpx.post(
            p.url + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": short, "max_tokens": 1, "temperature": 0,
                "kv_transfer_params": {"do_remote_decode": True}}).json()["kv_transfer_params"])})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[short], r.text
