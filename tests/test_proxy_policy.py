# SPDX-License-Identifier: Apache-2.0
"""The proxy's picking policies, on backends marked healthy (no servers)."""

from __future__ import annotations

from collections import Counter

from kvbridge.serve.proxy.backends import BackendPool, LeastOutstanding, RoundRobin


def pool(policy, n_prefill=2, n_decode=2) -> BackendPool:
    p = BackendPool([f"http://p{i}" for i in range(n_prefill)],
                    [f"http://d{i}" for i in range(n_decode)], client=None, picker=policy)
    for b in p.all:
        b.healthy = True
    return p


def pairs(p: BackendPool, n: int) -> list[tuple[str, str]]:
    return [(p.pick("prefill").url[7:], p.pick("decode").url[7:]) for _ in range(n)]


def test_round_robin_walks_every_pairing_and_balances_each_pool():
    seen = pairs(pool(RoundRobin()), 8)
    assert Counter(seen) == {("p0", "d0"): 2, ("p1", "d1"): 2, ("p0", "d1"): 2, ("p1", "d0"): 2}
    # 3 prefill x 2 decode: all six pairings in six requests, even load.
    seen = pairs(pool(RoundRobin(), 3, 2), 6)
    assert set(seen) == {(f"p{i}", f"d{j}") for i in range(3) for j in range(2)}
    assert Counter(d for _, d in seen) == {"d0": 3, "d1": 3}


def test_round_robin_skips_unusable_backends():
    p = pool(RoundRobin())
    p.decode[1].healthy = False
    assert {d for _, d in pairs(p, 6)} == {"d0"}
    assert {pre for pre, _ in pairs(p, 6)} == {"p0", "p1"}


def test_least_outstanding_prefers_the_idle_one():
    p = pool(LeastOutstanding())
    p.prefill[0].outstanding = 3
    assert p.pick("prefill").url == "http://p1"


def test_round_robin_pairs_cover_uneven_pools():
    seen = pairs(pool(RoundRobin(), 2, 4), 8)
    assert set(seen) == {(f"p{i}", f"d{j}") for i in range(2) for j in range(4)}
