# SPDX-License-Identifier: Apache-2.0
"""Producer and consumer on different hosts: network namespaces joined by a
bridge (``kvbridge.bench.netns``), each side with its own address, nothing on
127.0.0.1 between them.

* ``kvbridge bench transport --listen`` on one host, ``--connect`` on the
  other: every byte verified over the veth link, for tcp and nixl (UCX on the
  namespace's device) and the raw baselines;
* the link pulled mid-transfer: the pull fails within the transfer timeout
  with a clear error, the producer frees the blocks, and once the link is
  back the next pull works (a fresh connection);
* real vLLM servers, prefill and decode on two hosts and the client on a
  third, over tcp and nixl: token-identical, no prompt token computed on
  decode, nothing listening on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbridge.bench import netns
from kvbridge.serve.launch import free_port

from helpers.procs import Consumer, Producer
from helpers.transport_peer import NETNS_ENV

WHY_NOT = netns.available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
KVBRIDGE = str(Path(sys.executable).parent / "kvbridge")
#: UCX finds both namespaces on one machine and would use shared memory; real
#: hosts without RDMA have TCP only.
UCX_BETWEEN_HOSTS = {"UCX_TLS": "tcp"}


@pytest.fixture
def hosts():
    with netns.Hosts(2) as pair:
        yield pair


def test_transport_bench_between_two_hosts(hosts, tmp_path):
    far, near = hosts
    port = free_port()
    env = {**os.environ, **UCX_BETWEEN_HOSTS, "UCX_NET_DEVICES": far.device,
           "KVBRIDGE_RESULTS_DIR": str(tmp_path), "KVBRIDGE_SECRET": "multihost-test"}
    log = open(tmp_path / "listen.log", "w")
    listener = subprocess.Popen(far.cmd(KVBRIDGE, "bench", "transport", "--listen",
                                        f"{far.address}:{port}"),
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "serving helpers" not in (tmp_path / "listen.log").read_text():
            assert listener.poll() is None, (tmp_path / "listen.log").read_text()
            assert time.monotonic() < deadline, "the --listen side did not start"
            time.sleep(0.2)
        out = tmp_path / "remote.json"
        proc = subprocess.run(
            near.cmd(KVBRIDGE, "bench", "transport", "--connect", f"{far.address}:{port}",
                     "--backends", "tcp,nixl", "--sizes", "64K,4M", "--reps", "2",
                     "--checksum", "on", "--baselines", "--json", str(out)),
            env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        listener.terminate()
        listener.wait(20)
        log.close()
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {r["backend"] for r in rows} >= {"tcp", "nixl", "socket", "nixl-raw", "memcpy"}
    assert all(r["verified"] for r in rows), [r for r in rows if not r["verified"]]
    md = (tmp_path / "transport-remote.md").read_text()
    assert f"over {far.address} (from this host's {near.address})" in md
    # The far ends ran on the far host: the listener started each of them.
    started = (tmp_path / "listen.log").read_text()
    assert started.count("started producer") == 2 and "started nixl-target" in started


def _rate_limit(host: netns.Host, rate: str) -> None:
    host.run("tc", "qdisc", "replace", "dev", host.device, "root", "tbf", "rate", rate,
             "burst", "64kb", "latency", "500ms")


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_link_down_mid_transfer_fails_cleanly_then_reconnects(hosts, backend):
    if backend == "nixl":
        pytest.importorskip("nixl._api")
    far, near = hosts
    # 1 MiB blocks; 48 of them take ~2 s through a 200 Mbit/s link.
    cache_kw = dict(num_blocks=128, block_size=128, kv_heads=8, head_size=128)
    transfer_timeout = 3.0
    lease_s = 6.0
    # UCX would see one machine and move the bytes through shared memory:
    # TCP only, as between two real hosts without RDMA.
    prod = Producer(backend, cache_kw=cache_kw,
                    config_kw=dict(host=far.address, transfer_timeout_s=transfer_timeout),
                    env={**UCX_BETWEEN_HOSTS, "UCX_NET_DEVICES": far.device,
                         NETNS_ENV: far.name})
    cons = Consumer(backend, cache_kw=cache_kw,
                    config_kw=dict(transfer_timeout_s=transfer_timeout,
                                   handshake_timeout_s=transfer_timeout),
                    env={**UCX_BETWEEN_HOSTS, "UCX_NET_DEVICES": near.device,
                         NETNS_ENV: near.name})
    try:
        assert prod.address.startswith(far.address + ":")
        remote, local = list(range(0, 48)), list(range(48, 96))
        _rate_limit(far, "200mbit")
        prod.publish("cut", remote, lease_s=lease_s)
        cons.pull(prod.address, "cut", remote, local)
        deadline = time.monotonic() + 30
        while cons.state("cut") != "transferring":
            assert time.monotonic() < deadline, cons.state("cut")
            time.sleep(0.02)
        time.sleep(0.3)
        assert cons.state("cut") == "transferring", "the pull ended before the link went down"
        far.link(False)
        t_down = time.monotonic()
        state, code, error, _ = cons.wait("cut", 60)
        failed_after = time.monotonic() - t_down
        assert state == "failed" and code in ("timeout", "peer_gone"), (state, code, error)
        assert error, "the failure must say why"
        assert failed_after < transfer_timeout + 5, f"failed only after {failed_after:.1f} s"
        # The producer gives the blocks back (its read never completed: at
        # lease end) and holds nothing.
        released = prod.wait_released(timeout=lease_s + 2 * transfer_timeout + 10)
        assert released == [("cut", "expired")], released
        assert prod.call("held") == {}
        # Link back: the next request goes through, on a new connection.
        far.link(True)
        far.run("tc", "qdisc", "del", "dev", far.device, "root", check=False)
        prod.publish("after", remote[:8])
        cons.pull(prod.address, "after", remote[:8], local[:8])
        state, code, error, _ = cons.wait("after", 60)
        assert state == "done", (state, code, error)
        assert cons.call("digest", local[:8]) == prod.call("digest", remote[:8])
    finally:
        cons.stop()
        prod.stop()


NETEM_WHY_NOT = netns.netem_available() if WHY_NOT is None else WHY_NOT


@pytest.mark.skipif(NETEM_WHY_NOT is not None, reason=f"no netem here: {NETEM_WHY_NOT}")
@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_pulls_complete_byte_exact_under_delay_and_loss(hosts, backend):
    """1 ms delay and 1 % loss on both ends of the link: every pull still
    lands the producer's bytes exactly."""
    if backend == "nixl":
        pytest.importorskip("nixl._api")
    far, near = hosts
    for host in hosts:
        host.netem("delay", "1ms", "loss", "1%")
    cache_kw = dict(num_blocks=64, block_size=128, kv_heads=8, head_size=128)
    prod = Producer(backend, cache_kw=cache_kw, config_kw=dict(host=far.address),
                    env={**UCX_BETWEEN_HOSTS, "UCX_NET_DEVICES": far.device, NETNS_ENV: far.name})
    cons = Consumer(backend, cache_kw=cache_kw,
                    env={**UCX_BETWEEN_HOSTS, "UCX_NET_DEVICES": near.device,
                         NETNS_ENV: near.name})
    try:
        for i, n in enumerate((1, 8, 24)):
            remote, local = list(range(n)), list(range(32, 32 + n))
            prod.publish(f"lossy-{i}", remote)
            cons.pull(prod.address, f"lossy-{i}", remote, local)
            state, code, error, _ = cons.wait(f"lossy-{i}", 120)
            assert state == "done", (state, code, error)
            assert cons.call("digest", local) == prod.call("digest", remote)
    finally:
        cons.stop()
        prod.stop()


# ---------------------------------------------------------------- vLLM servers
PROMPT = "The socket module provides access to the BSD socket interface; " * 3


@pytest.mark.vllm
@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_vllm_pair_on_two_hosts(tiny_model_dir, tmp_path, backend):
    """Real api_server processes: prefill on one host, decode on a second, this
    test's HTTP client (the router's place) on a third. The producer binds
    and advertises its own address - nothing listens on 127.0.0.1 - and the
    decode answer equals a colocated one with no prompt token computed."""
    import httpx
    import test_xpyd as X

    from kvbridge.serve.launch import kv_transfer_config, start_server, stop_all, wait_healthy

    if backend == "nixl":
        pytest.importorskip("nixl._api")
    with netns.Hosts(3) as (p_host, d_host, client):
        kv_port = free_port()
        servers = []
        try:
            for role, host, core, extra in (
                    ("kv_producer", p_host, 0, {"host": p_host.address}),
                    ("kv_consumer", d_host, 1, {})):
                env = {**UCX_BETWEEN_HOSTS, "UCX_NET_DEVICES": host.device}
                servers.append(start_server(
                    role, tiny_model_dir, free_port(), cpu_core=core, log_dir=tmp_path,
                    served_name=X.MODEL, host=host.address, netns=host.name, env=env,
                    kv_config=kv_transfer_config(role, transport=backend, kv_port=kv_port,
                                                 extra=extra)))
            wait_healthy(servers, timeout_s=400)
            prefill, decode = servers

            def complete(url, params=None, max_tokens=X.MAX_TOKENS):
                body = {"model": X.MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True}
                if params is not None:
                    body["kv_transfer_params"] = params
                r = httpx.post(url + "/v1/completions", json=body, timeout=180)
                assert r.status_code == 200, r.text
                return r.json()

            def exchange():
                colocated = complete(decode.url)["choices"][0]["text"]
                before = (X.computed(decode.url), X.loaded(decode.url))
                params = complete(prefill.url, {"do_remote_decode": True}, 1)[
                    "kv_transfer_params"]
                answer = complete(decode.url, params)
                return (colocated, before, params, answer,
                        (X.computed(decode.url), X.loaded(decode.url)))

            colocated, before, params, answer, after = netns.call_in(client.name, exchange)
            assert params["remote_addresses"] == [f"{p_host.address}:{kv_port}"], params
            assert params["transport"] == backend, params
            assert answer["choices"][0]["text"] == colocated
            assert after[0] == before[0], "decode computed prompt tokens"
            assert after[1] - before[1] == answer["usage"]["prompt_tokens"], (before, after)

            def loopback_refused():
                import socket
                try:
                    socket.create_connection(("127.0.0.1", kv_port), timeout=2).close()
                except OSError:
                    return True
                return False

            assert netns.call_in(p_host.name, loopback_refused), \
                "the producer also listens on 127.0.0.1"
            netns.call_in(client.name, X.producers_free, [prefill])
        finally:
            stop_all(servers)
