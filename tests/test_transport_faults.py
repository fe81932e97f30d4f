# SPDX-License-Identifier: Apache-2.0
"""Faults between real producer and consumer processes, on every transport:
corrupted bytes caught by the end-to-end checksums, a producer restarted on
the same address, requests handed back with Release."""

from __future__ import annotations

# Fixtures (tests/conftest.py): backend, producers, consumers.

import time

from helpers.transport_peer import digest
from kvbridge.serve.launch import free_port
from kvbridge.transport import TransferState


def wait_released(prod, request_id: str, timeout: float = 10.0) -> list:
    """Poll the producer until ``request_id`` is released; returns the events."""
    deadline = time.monotonic() + timeout
    seen: list = []
    while time.monotonic() < deadline:
        seen += prod.call("poll")
        if any(rid == request_id for rid, _ in seen):
            return seen
        time.sleep(0.05)
    return seen


def test_flipped_byte_fails_the_pull_and_frees_the_producer(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend, config_kw=dict(fault_flip_byte_every=2))
    prod.publish("ok", [1, 2, 3])
    prod.publish("bad", [4, 5, 6])
    h1 = cons.pull(prod.address, "ok", [1, 2, 3], [10, 11, 12])
    assert h1.wait(30) == TransferState.DONE, h1.error
    h2 = cons.pull(prod.address, "bad", [4, 5, 6], [13, 14, 15])
    assert h2.wait(30) == TransferState.FAILED
    assert "checksum mismatch: 1 of 3 blocks" in h2.error
    # Exactly the corrupted block is named, so an engine recomputes from there.
    assert h2.invalid_local_ids == [13]
    assert digest(cons.cache, [14, 15]) == prod.call("digest", [5, 6])
    m = cons.metrics()
    assert m["checksum_failures"] == 1 and m["blocks_verified"] == 6
    # The failed pull handed the request back: freed now, not at lease end.
    assert ("bad", "released") in wait_released(prod, "bad")


#: llama-8B-sized blocks (1 MiB: two layers of 512 KiB), enough of them that a
#: pull of 12 takes the large-read paths (cma: several threads reading and
#: digesting in C as the bytes land)
BIG_BLOCKS = dict(num_blocks=16, block_size=128, kv_heads=8, head_size=128, layers=2)


def test_a_block_changed_after_publish_fails_a_large_pull(backend, producers, consumers):
    """The producer's bytes changed under its digest (a block reused, memory
    gone bad): every backend names exactly that block, on a pull big enough to
    be read and digested in parallel as it lands."""
    prod = producers(backend, cache_kw=BIG_BLOCKS)
    cons = consumers(backend, **BIG_BLOCKS)
    ids = list(range(12))
    local = [15 - i for i in ids]  # reversed: nothing contiguous to merge
    prod.publish("clean", ids)
    h = cons.pull(prod.address, "clean", ids, local)
    assert h.wait(60) == TransferState.DONE, h.error
    assert h.nbytes == 12 << 20
    assert digest(cons.cache, local) == prod.call("digest", ids)
    prod.publish("changed", ids)
    prod.call("flip", 9, 4321)
    h = cons.pull(prod.address, "changed", ids, local)
    assert h.wait(60) == TransferState.FAILED
    assert "checksum mismatch: 1 of 12 blocks" in h.error, h.error
    assert h.invalid_local_ids == [local[9]]
    others = [i for i in ids if i != 9]
    assert digest(cons.cache, [15 - i for i in others]) == prod.call("digest", others)


def test_checksums_off_lands_the_flipped_byte(backend, producers, consumers):
    """The same fault with checksums off is silent garbage: what the check buys."""
    prod = producers(backend, config_kw=dict(checksum=False))
    cons = consumers(backend, config_kw=dict(fault_flip_byte_every=1))
    prod.publish("r", [1, 2])
    h = cons.pull(prod.address, "r", [1, 2], [3, 4])
    assert h.wait(30) == TransferState.DONE, h.error
    assert digest(cons.cache, [3]) != prod.call("digest", [1])
    assert cons.metrics()["blocks_verified"] == 0


def test_restarted_producer_fails_old_requests_at_once_and_serves_new_ones(
        backend, producers, consumers):
    port = free_port()
    first = producers(backend, config_kw=dict(port=port))
    first.publish("old", [1, 2])
    cons = consumers(backend, config_kw=dict(publish_wait_s=20))
    h = cons.pull(first.address, "old", [1, 2], [1, 2])
    assert h.wait(30) == TransferState.DONE, h.error
    old_instance = cons._peers[first.address].instance
    first.publish("stranded", [3])
    first.kill()
    second = producers(backend, config_kw=dict(port=port))
    assert second.address == first.address
    second.publish("new", [5, 6])
    # A request of the dead process: refused at once (not after publish_wait_s).
    t0 = time.monotonic()
    h = cons.pull(second.address, "stranded", [3], [3], producer_instance=old_instance)
    assert h.wait(30) == TransferState.FAILED
    assert time.monotonic() - t0 < 5
    assert "restarted" in h.error, h.error
    # The consumer dropped its broken connection and shook hands afresh.
    h = cons.pull(second.address, "new", [5, 6], [7, 8])
    assert h.wait(30) == TransferState.DONE, h.error
    assert digest(cons.cache, [7, 8]) == second.call("digest", [5, 6])
    assert cons.metrics()["handshakes"] == 2


def test_release_remote_frees_an_unread_request_now(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend)
    prod.publish("abandoned", [1, 2, 3])
    cons.release_remote(prod.address, "abandoned", "aborted")
    assert ("abandoned", "released") in wait_released(prod, "abandoned")
    assert prod.call("held") == {}
    assert prod.call("metrics")["releases_received"] == 1
