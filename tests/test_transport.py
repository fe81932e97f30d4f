# SPDX-License-Identifier: Apache-2.0
"""One suite, every backend: a real producer process, real sockets, real memory.

The producer runs in its own process (``helpers.transport_peer``) driven over
a pipe; the consumer is this process.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import pytest

from conftest import TRANSPORT_BACKENDS
from helpers.procs import ENV, NUM_BLOCKS, Producer, sigstop, stopped  # noqa: F401 - shared
from helpers.transport_peer import digest, make_cache
from kvbridge import protocol as P
from kvbridge.cache import checksum
from kvbridge.layout import LayoutMismatchError
from kvbridge.transport import (
    TransferError,
    TransferState,
    available,
    create_transport,
)

# Fixtures (tests/conftest.py): backend (every transport), producers (producer
# processes, stopped at teardown), consumers (transports here, closed at teardown).
BACKENDS = TRANSPORT_BACKENDS


def test_scattered_blocks_are_byte_exact(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend)
    rng = random.Random(1)
    remote = rng.sample(range(NUM_BLOCKS), 24)
    local = rng.sample(range(NUM_BLOCKS), 24)
    untouched = [b for b in range(NUM_BLOCKS) if b not in local]
    before = digest(cons.cache, untouched)
    prod.publish("req-1", remote)
    h = cons.pull(prod.address, "req-1", remote, local)
    assert h.wait(30) == TransferState.DONE, h.error
    assert digest(cons.cache, local) == prod.call("digest", remote)
    assert digest(cons.cache, untouched) == before, "a block outside the pull changed"
    # The producer learns the blocks were read and may free them.
    deadline = time.monotonic() + 5
    released = []
    while time.monotonic() < deadline and not released:
        released = prod.call("poll")
        time.sleep(0.02)
    assert released == [("req-1", "read")]
    m = cons.metrics()
    assert m["transfers_done"] == 1 and m["bytes_pulled"] == h.nbytes > 0


def test_adjacent_runs_and_partial_overlap(backend, producers, consumers):
    """Runs of consecutive ids on one side only must still pair block by block."""
    prod = producers(backend)
    cons = consumers(backend)
    remote = [3, 4, 5, 6, 10, 11, 40]
    local = [20, 21, 9, 8, 30, 31, 0]
    prod.publish("r", remote)
    h = cons.pull(prod.address, "r", remote, local)
    assert h.wait(30) == TransferState.DONE, h.error
    for r, lo in zip(remote, local):
        assert digest(cons.cache, [lo]) == prod.call("digest", [r])


def test_concurrent_requests_on_one_connection(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend)
    handles = []
    for i in range(8):
        remote = list(range(i * 8, i * 8 + 8))
        local = list(range(NUM_BLOCKS - 8 * (i + 1), NUM_BLOCKS - 8 * i))
        prod.publish(f"c{i}", remote)
        handles.append((cons.pull(prod.address, f"c{i}", remote, local), remote, local))
    for h, remote, local in handles:
        assert h.wait(30) == TransferState.DONE, h.error
        assert digest(cons.cache, local) == prod.call("digest", remote)
    assert cons.metrics()["handshakes"] == 1, "descriptors/handshake must be reused per peer"


def _wait_state(h, state, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while h.state != state and time.monotonic() < deadline:
        time.sleep(0.005)
    assert h.state == state, (h.state, h.error)


def test_cancelled_transfer_writes_nothing_and_keeps_the_lease(backend, producers, consumers):
    """Cancel a pull mid-flight: the Pull is sent, but the producer is held
    (SIGSTOP) so it cannot grant before the cancel. Once it runs again its
    grant must land nowhere, and the blocks stay leased for a new pull."""
    prod = producers(backend)
    cons = consumers(backend)
    prod.publish("x", [1, 2, 3])
    before = digest(cons.cache, [4, 5, 6])
    cons.handshake(prod.address)
    with stopped(prod.proc.pid):  # the pull is sent but cannot be granted
        h = cons.pull(prod.address, "x", [1, 2, 3], [4, 5, 6])
        _wait_state(h, TransferState.TRANSFERRING)
        h.cancel()
        assert not h.state.finished  # mid-flight: it ends at the producer's reply
    assert h.wait(30) == TransferState.CANCELLED, h.error
    assert digest(cons.cache, [4, 5, 6]) == before, "a cancelled pull wrote a local block"
    assert cons.metrics()["transfers_cancelled"] == 1
    # Not read: the producer still holds the blocks, and a new pull succeeds.
    assert "x" in prod.call("held")
    h2 = cons.pull(prod.address, "x", [1, 2, 3], [4, 5, 6])
    assert h2.wait(30) == TransferState.DONE, h2.error
    assert digest(cons.cache, [4, 5, 6]) == prod.call("digest", [1, 2, 3])


def test_cancel_before_handshake_is_immediate(backend, producers, consumers):
    """A pull still handshaking (the producer is held, so it cannot answer
    Hello) is cancelled at once; nothing is sent for it and the request
    stays published."""
    prod = producers(backend)
    cons = consumers(backend)
    prod.publish("y", [1])
    before = digest(cons.cache, [2])
    with stopped(prod.proc.pid):
        h = cons.pull(prod.address, "y", [1], [2])
        _wait_state(h, TransferState.HANDSHAKING)
        assert h.cancel() is True
        assert h.state == TransferState.CANCELLED and h.wait(0) == TransferState.CANCELLED
    assert prod.call("poll") == []  # nothing released or read
    assert digest(cons.cache, [2]) == before
    h2 = cons.pull(prod.address, "y", [1], [2])
    assert h2.wait(30) == TransferState.DONE, h2.error
    assert digest(cons.cache, [2]) == prod.call("digest", [1])


@pytest.mark.parametrize("field,cache_kw,expect", [
    ("block_size", dict(block_size=64), "block_size: local 64, remote 32"),
    ("dtype", dict(dtype="float32"),
     "model_dtype: local float32, remote bfloat16; kv_cache_dtype: local float32, "
     "remote bfloat16"),
    ("model", dict(model="other"), "model: local other, remote test-model"),
])
def test_layout_mismatch_refused_before_transfer(backend, producers, consumers, field, cache_kw,
                                                 expect):
    prod = producers(backend)
    cons = consumers(backend, **cache_kw)
    prod.publish("m", [1, 2])
    with pytest.raises(LayoutMismatchError) as err:
        cons.handshake(prod.address)
    assert expect in str(err.value)
    h = cons.pull(prod.address, "m", [1, 2], [3, 4])
    assert h.wait(30) == TransferState.FAILED
    assert expect in h.error
    # The producer named the same fields (its local is our remote) and served nothing.
    m = prod.call("metrics")
    assert any(field.split("_")[0] in r for r in m["refusals"]), m["refusals"]
    assert m["pulls_served"] == 0
    # The refused request is handed back at once (issue 11): the producer frees
    # its blocks now, not at lease end, and the refused connection carried it.
    released = prod.wait_released()
    assert released == [("m", "released")], released
    assert prod.call("metrics")["releases_received"] == 1
    assert cons.metrics()["handshakes_refused"] == 1


def test_unauthenticated_peer_is_refused(backend, producers, consumers):
    prod = producers(backend, config_kw=dict(secret="s3cret"))
    prod.publish("a", [1])
    nosecret = consumers(backend)
    nosecret.secret = None
    with pytest.raises(TransferError, match="shared secret"):
        nosecret.handshake(prod.address)
    wrong = consumers(backend, config_kw=dict(secret="wrong"))
    with pytest.raises(TransferError, match="authentication failed"):
        wrong.handshake(prod.address)
    right = consumers(backend, config_kw=dict(secret="s3cret"))
    h = right.pull(prod.address, "a", [1], [1])
    assert h.wait(30) == TransferState.DONE, h.error
    assert prod.call("metrics")["refusals"] == ["authentication failed"]


def test_secret_from_environment(backend, producers, consumers, monkeypatch):
    prod = producers(backend, env={P.SECRET_ENV: "from-env"})
    prod.publish("e", [2])
    monkeypatch.setenv(P.SECRET_ENV, "from-env")
    cons = consumers(backend)
    assert cons.pull(prod.address, "e", [2], [2]).wait(30) == TransferState.DONE


def test_pull_waits_for_a_late_publish(backend, producers, consumers):
    """The consumer may hear of a request before the producer's engine step
    publishes it: the pull keeps asking for ``publish_wait_s``."""
    prod = producers(backend)
    cons = consumers(backend)
    h = cons.pull(prod.address, "late", [1, 2], [5, 6])
    time.sleep(0.5)
    assert not h.done()
    prod.publish("late", [1, 2])
    assert h.wait(30) == TransferState.DONE, h.error
    assert digest(cons.cache, [5, 6]) == prod.call("digest", [1, 2])


def test_unknown_request_id_is_a_clear_error(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend, config_kw=dict(publish_wait_s=0.3))
    h = cons.pull(prod.address, "never-published", [1], [1])
    assert h.wait(30) == TransferState.FAILED
    assert "unknown request id 'never-published': not published" in h.error
    # Blocks outside what was published are refused too.
    prod.publish("p", [1, 2])
    h = cons.pull(prod.address, "p", [1, 9], [1, 2])
    assert h.wait(30) == TransferState.FAILED and "not published" in h.error
    # A failed pull is final: the consumer handed "p" back and it was freed.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and ("p", "released") not in prod.call("poll"):
        time.sleep(0.05)
    assert "p" not in prod.call("held")
    # The connection still serves.
    prod.publish("q", [1, 2])
    h = cons.pull(prod.address, "q", [1, 2], [1, 2])
    assert h.wait(30) == TransferState.DONE, h.error


def test_producer_killed_mid_transfer_fails_fast_and_frees(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend, config_kw=dict(transfer_timeout_s=20))
    prod.publish("k", list(range(32)))
    cons.handshake(prod.address)
    sigstop(prod.proc.pid)  # the pull is sent but never granted
    h = cons.pull(prod.address, "k", list(range(32)), list(range(32)))
    deadline = time.monotonic() + 5
    while h.state != TransferState.TRANSFERRING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.state == TransferState.TRANSFERRING
    t0 = time.monotonic()
    prod.kill()
    assert h.wait(10) == TransferState.FAILED
    assert time.monotonic() - t0 < 10
    assert "closed" in h.error or "failed" in h.error
    # Nothing held for the dead peer: its connection and in-flight list are gone.
    assert not cons._peers
    assert cons.metrics()["transfers_failed"] == 1


def test_hung_producer_times_out(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend, config_kw=dict(transfer_timeout_s=1.5))
    prod.publish("h", [1])
    cons.handshake(prod.address)
    sigstop(prod.proc.pid)
    t0 = time.monotonic()
    h = cons.pull(prod.address, "h", [1], [1])
    assert h.wait(15) == TransferState.FAILED
    assert 1.0 < time.monotonic() - t0 < 8
    assert "no progress" in h.error
    os.kill(prod.proc.pid, signal.SIGCONT)


def test_dead_producer_before_handshake(backend, consumers):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    cons = consumers(backend)
    h = cons.pull(f"127.0.0.1:{port}", "r", [1], [1])
    assert h.wait(10) == TransferState.FAILED and "refused" in h.error.lower()


def test_lease_expires_when_nobody_pulls(backend, producers):
    prod = producers(backend, config_kw=dict(lease_s=0.5))
    prod.publish("lonely", [5, 6, 7])
    prod.publish("short", [8], lease_s=0.2)
    deadline = time.monotonic() + 5
    released = []
    while time.monotonic() < deadline and len(released) < 2:
        released += prod.call("poll")
        time.sleep(0.1)
    assert sorted(released) == [("lonely", "expired"), ("short", "expired")]
    assert prod.call("metrics")["held_requests"] == 0


def test_release_frees_at_once_and_late_pull_is_refused(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend)
    prod.publish("gone", [1, 2])
    assert prod.call("release", "gone") is True  # e.g. the request was aborted
    assert prod.call("poll") == [("gone", "released")]
    # A late read is refused, never served from blocks that may be reused.
    t0 = time.monotonic()
    h = cons.pull(prod.address, "gone", [1, 2], [1, 2])
    assert h.wait(30) == TransferState.FAILED and "already released" in h.error
    assert time.monotonic() - t0 < 2, "a released request must fail at once, not be retried"
    assert prod.call("release", "gone") is False


def test_progress_wakes_an_idle_engine_at_once(backend):
    """What vLLM's empty steps wait on (``KVAgent.wait_progress``): a pull that
    finishes wakes the consumer, a read that lets a lease go wakes the
    producer, at once; with nothing in flight the wait times out."""
    from kvbridge.agent import KVAgent

    producer = KVAgent(make_cache(NUM_BLOCKS, seed=3), transport=backend, name="prod")
    consumer = KVAgent(make_cache(NUM_BLOCKS, seed=None), transport=backend, name="cons")
    try:
        producer.serve()
        for agent in (producer, consumer):
            t0 = time.monotonic()
            assert agent.wait_progress(0.05) is False  # nothing in flight
            assert time.monotonic() - t0 >= 0.04
        ticket = producer.publish("wake", [3, 4, 5])
        assert producer.wait_progress(0) is False  # a publish is not progress
        handle = consumer.pull(ticket, [10, 11, 12])
        t0 = time.monotonic()
        assert consumer.wait_progress(30) is True
        assert handle.done() and handle.state == TransferState.DONE, handle
        # The event is consumed: the next wait waits again.
        assert consumer.wait_progress(0) is False
        assert producer.wait_progress(30) is True
        assert producer.poll_released() == [("wake", "read")]
        assert time.monotonic() - t0 < 10
    finally:
        consumer.close()
        producer.close()


def test_pull_refuses_bad_local_ids(backend, consumers):
    cons = consumers(backend)
    with pytest.raises(ValueError, match="out of range"):
        cons.pull("127.0.0.1:1", "r", [1], [NUM_BLOCKS])
    with pytest.raises(ValueError, match="2 remote block ids but 1 local"):
        cons.pull("127.0.0.1:1", "r", [1, 2], [1])


def test_publish_is_idempotent_and_never_revives_a_read_request(backend, producers, consumers):
    prod = producers(backend)
    cons = consumers(backend)
    prod.publish("twice", [1, 2])
    prod.publish("twice", [1, 2])  # a repeated publish (a retried control send)
    h = cons.pull(prod.address, "twice", [1, 2], [3, 4])
    assert h.wait(30) == TransferState.DONE, h.error
    deadline = time.monotonic() + 5
    released = []
    while time.monotonic() < deadline and not released:
        released = prod.call("poll")
    assert released == [("twice", "read")]
    prod.publish("twice", [1, 2])  # a late repeat after the read
    assert prod.call("metrics")["held_requests"] == 0


def test_control_client_publishes_without_the_engine(backend, producers, consumers):
    from kvbridge.vllm.control import ControlClient

    prod = producers(backend)
    cons = consumers(backend)
    ctl = ControlClient(prod.address, cons.layout, None)
    try:
        assert ctl.publish("ctl-req", [5, 6], None)
        h = cons.pull(prod.address, "ctl-req", [5, 6], [7, 8])
        assert h.wait(30) == TransferState.DONE, h.error
        assert digest(cons.cache, [7, 8]) == prod.call("digest", [5, 6])
    finally:
        ctl.close()


def test_control_publish_the_transport_cannot_carry_out_is_refused(backend, producers,
                                                                   consumers):
    """The scheduler's control publish is the only publish: one that fails
    (here: block ids out of range) comes back as the request released with
    reason "refused", so the engine frees its blocks, and a consumer reading
    it fails at once with code "ended" instead of waiting for a publish."""
    from kvbridge.errors import ErrorCode
    from kvbridge.vllm.control import ControlClient

    prod = producers(backend)
    cons = consumers(backend)
    ctl = ControlClient(prod.address, cons.layout, None)
    try:
        assert ctl.publish("bad-req", [5, 10**6], None)  # sent; the transport refuses it
        assert prod.wait_released() == [("bad-req", "refused")]
        t0 = time.monotonic()
        h = cons.pull(prod.address, "bad-req", [5, 6], [7, 8])
        assert h.wait(30) == TransferState.FAILED
        assert h.error_code == ErrorCode.ENDED and "refused at publish" in h.error
        assert time.monotonic() - t0 < 5, "the consumer waited for a publish that never comes"
        # A request published, then released by the scheduler over the same
        # connection (another rank failed): freed at once, never readable.
        assert ctl.publish("dropped", [5, 6], None)
        assert ctl.release("dropped", "publish failed on another rank")
        assert prod.wait_released() == [("dropped", "released")]
        assert prod.call("held") == {}
    finally:
        ctl.close()


def test_control_client_reaches_a_reopened_transport(producers, consumers):
    """A worker's transport closed and reopened on the same port (vLLM's sleep
    mode, a restart): the scheduler's next publish reaches the new one. Sent
    on the connection the old transport closed, it would leave this process
    without an error and be lost."""
    from kvbridge.serve.launch import free_port
    from kvbridge.vllm.control import ControlClient

    def held_soon(producer, request_id):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if request_id in producer.call("held"):
                return True
            time.sleep(0.05)
        return False

    port = free_port()
    first = producers("tcp", config_kw={"port": port})
    cons = consumers("tcp")
    ctl = ControlClient(first.address, cons.layout, None)
    try:
        assert ctl.publish("before", [1, 2], None)
        assert held_soon(first, "before")
        first.call("stop")  # closes the transport, as unregister_kv_caches does
        second = producers("tcp", config_kw={"port": port})
        assert second.address == first.address
        assert ctl.publish("after", [3, 4], None)
        assert held_soon(second, "after")
    finally:
        ctl.close()


# ---------------------------------------------------------------- tensor parallelism
@pytest.mark.parametrize("tp_prod,tp_cons,memory_layout", [
    (1, 2, "LBHNC"), (2, 1, "LBHNC"), (2, 4, "LBNHC"), (4, 2, "LBNHC")])
def test_mixed_tp_reads_each_ranks_heads(backend, producers, consumers, tp_prod, tp_cons,
                                         memory_layout):
    """Producer ranks of one TP size, consumer ranks of another: each consumer
    rank pulls what ``plan_reads`` says and ends up with exactly the heads it
    holds at its TP size; every producer rank frees the request only after
    all of its readers have read."""
    from kvbridge.cache.shard import plan_reads, unread_ranks

    heads = 4
    cache_kw = dict(kv_heads=heads, memory_layout=memory_layout)
    prods = [producers(backend, cache_kw=dict(cache_kw, tp_size=tp_prod, tp_rank=p))
             for p in range(tp_prod)]
    remote_ids, local_ids = [3, 7, 8, 20], [40, 2, 3, 9]
    for p in prods:
        p.publish("req", remote_ids)
    cons = [consumers(backend, seed=None, tp_size=tp_cons, tp_rank=r, **cache_kw)
            for r in range(tp_cons)]
    handles = []
    for c in cons:
        plan = plan_reads(c.layout, tp_prod)
        assert {r.remote_rank for r in plan} | set(unread_ranks(c.layout, tp_prod)) <= set(
            range(tp_prod))
        for read in plan:
            handles.append(c.pull(prods[read.remote_rank].address, "req", remote_ids,
                                  local_ids, remote_slice=read.remote_slice,
                                  local_slice=read.local_slice, readers=read.readers))
    for h in handles:
        assert h.wait(60) == TransferState.DONE, h.error
    for r, c in enumerate(cons):
        want = make_cache(NUM_BLOCKS, 11, tp_size=tp_cons, tp_rank=r, **cache_kw)
        # Byte-exact: local block local_ids[i] holds what remote_ids[i] holds at this TP.
        for got_view, want_view in zip(c.cache.byte_views, want.byte_views):
            for lo, ro in zip(local_ids, remote_ids):
                assert bytes(got_view[lo].numpy()) == bytes(want_view[ro].numpy()), (r, lo)
        assert c.metrics()["checksum_failures"] == 0
    for p in prods:
        released = p.wait_released()
        assert released == [("req", "read")], released


def test_a_slice_that_does_not_fit_fails_clearly(backend, producers, consumers):
    from kvbridge.cache.shard import BlockSlice

    prod = producers(backend, cache_kw=dict(kv_heads=4))
    prod.publish("req", [1, 2])
    cons = consumers(backend, kv_heads=4)
    # A quarter of the remote block into a whole local block: sizes differ.
    h = cons.pull(prod.address, "req", [1, 2], [3, 4],
                  remote_slice=BlockSlice(0, cons.layout.block_bytes // 4))
    assert h.wait(30) == TransferState.FAILED
    assert "does not fit" in h.error
    # A slice past the end of the producer's block is refused by the producer.
    h = cons.pull(prod.address, "req", [1, 2], [3, 4],
                  remote_slice=BlockSlice(cons.layout.block_bytes, cons.layout.block_bytes),
                  local_slice=None)
    assert h.wait(30) == TransferState.FAILED


def test_agent_pull_sharded_reads_one_replica_and_frees_the_others(producers):
    """The custom-engine API's TP read (``KVAgent.pull_sharded``, what the
    vLLM connector uses): an MLA-like cache (one head, replicated on both
    producer ranks) read by a TP-1 consumer comes from rank 0 whole, and rank
    1, which nobody reads, is told to free the request at once."""
    from kvbridge.agent import KVAgent

    cache_kw = dict(kv_heads=1)
    prods = [producers("tcp", cache_kw=dict(cache_kw, tp_size=2, tp_rank=p)) for p in range(2)]
    for p in prods:
        p.publish("mla", [4, 5, 6])
    agent = KVAgent(make_cache(NUM_BLOCKS, None, **cache_kw), transport="tcp")
    try:
        handles = agent.pull_sharded([p.address for p in prods], "mla", [4, 5, 6], [1, 2, 3])
        assert len(handles) == 1 and handles[0].peer == prods[0].address
        assert handles[0].wait(60) == TransferState.DONE, handles[0].error
        want = make_cache(NUM_BLOCKS, 11, **cache_kw)
        assert digest(agent.cache, [1, 2, 3]) == digest(want, [4, 5, 6])
        for p, reason in zip(prods, ("read", "released")):
            released = p.wait_released()
            assert released == [("mla", reason)], (p.address, released)
    finally:
        agent.close()


def test_custom_layout_of_another_tp_size_is_refused_at_the_handshake(producers, consumers):
    """Whole blocks only for a custom layout: a TP-2 consumer of a TP-1 producer
    is refused before any byte moves, naming tp_size and the layout."""
    prod = producers("tcp", cache_kw=dict(memory_layout="custom"))
    cons = consumers("tcp", memory_layout="custom", tp_size=2, tp_rank=0)
    with pytest.raises(LayoutMismatchError) as err:
        cons.handshake(prod.address)
    msg = str(err.value)
    assert "tp_size: local 2, remote 1" in msg and "memory_layout: local custom" in msg, msg
    assert prod.call("metrics")["pulls_served"] == 0


@pytest.mark.parametrize("window", [1, 1000, 1 << 16, 8 << 20])
def test_tcp_scatter_gather_io_moves_every_byte_in_order(window, monkeypatch):
    """The tcp transport's sendmsg/recvmsg_into loops hand each call a window
    of the buffers (``IO_WINDOW_BYTES``): whatever the window, every byte lands
    in its buffer, and the progress callback moves forward only."""
    import threading

    from kvbridge.transport import tcp

    monkeypatch.setattr(tcp, "IO_WINDOW_BYTES", window)
    rng = random.Random(window)
    sizes = [rng.randint(1, 70_000) for _ in range(1500)]
    data = rng.randbytes(sum(sizes))
    src, off = [], 0
    for size in sizes:
        src.append(memoryview(data)[off:off + size])
        off += size
    dst = [memoryview(bytearray(size)) for size in sizes]
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        seen: list[tuple[int, int]] = []
        sender = threading.Thread(target=tcp.send_buffers, args=(a, src))
        sender.start()
        tcp.recv_buffers(b, dst, 10, lambda i, o: seen.append((i, o)))
        sender.join()
    assert b"".join(bytes(d) for d in dst) == data
    assert seen[-1] == (len(sizes), 0)
    assert seen == sorted(seen)


@pytest.mark.skipif("cma" not in available(), reason="cma is not available here")
@pytest.mark.parametrize("slices", [False, True])
def test_cma_small_reads_plan_the_same_iovecs_as_large_ones(monkeypatch, slices):
    """A read of few runs builds its iovecs in plain Python, a large one with
    numpy: both must name the same bytes, adjacent runs merged alike."""
    from kvbridge.cache.shard import BlockSlice, paired_slices
    from kvbridge.transport import cma
    from kvbridge.transport.direct import parse_regions, region_info

    remote_cache = make_cache(16, 1, regions_per_layer=2)
    local_cache = make_cache(16, None, regions_per_layer=2)
    bb = local_cache.layout.block_bytes
    regions, _ = parse_regions(region_info(remote_cache))
    with create_transport("cma", local_cache) as t:
        rng = random.Random(7)
        for _ in range(40):
            n = rng.randint(1, 8)
            remote_ids = rng.sample(range(16), n)
            local_ids = rng.sample(range(16), n)
            if rng.random() < 0.5:  # runs adjacent on both sides merge
                remote_ids, local_ids = sorted(remote_ids), sorted(local_ids)
            r_sl, l_sl = paired_slices(BlockSlice(16, 32, 4) if slices else None,
                                       BlockSlice(64, 32, 4) if slices else None, bb, bb)

            def spans(small: bool):
                monkeypatch.setattr(cma, "SMALL_READ_RUNS", 1 << 30 if small else 0)
                out = [[], []]
                for local, remote in t._batches(regions, bb, r_sl, remote_ids, l_sl, local_ids):
                    out[0] += [tuple(int(x) for x in s) for s in local]
                    out[1] += [tuple(int(x) for x in s) for s in remote]
                return out

            small, large = spans(True), spans(False)
            assert small == large
            assert sum(n for _, n in small[0]) == t.cache.staging_bytes(n, l_sl if slices else None)


# -- auto: the medium chosen per producer ------------------------------------------------

def _pull_all(cons, address: str, rid: str, remote: list[int], local: list[int]) -> None:
    h = cons.pull(address, rid, remote, local)
    assert h.wait(30) == TransferState.DONE, h.error


def test_auto_reads_this_hosts_producers_by_cma_and_others_by_tcp(producers, consumers, caplog):
    """``auto`` asks each producer for cma first and falls back to tcp where
    the producer refuses it (here: a producer that serves tcp only); an auto
    producer serves auto, tcp and cma consumers alike."""
    auto_prod, tcp_prod = producers("auto"), producers("tcp")
    cons = consumers("auto")
    remote, local = [5, 9, 2, 30], [1, 40, 41, 7]
    caplog.set_level("INFO", logger="kvbridge.transport")
    for prod, medium in ((auto_prod, "cma"), (tcp_prod, "tcp")):
        prod.publish(f"r-{medium}", remote)
        _pull_all(cons, prod.address, f"r-{medium}", remote, local)
        assert digest(cons.cache, local) == prod.call("digest", remote)
    m = cons.metrics()
    assert m["media"] == {"cma": 1, "tcp": 1} and m["handshakes"] == 2
    assert m["transport"] == "auto" and m["transfers_done"] == 2
    assert any("cma cannot reach producer" in r.getMessage() and tcp_prod.address in
               r.getMessage() for r in caplog.records)
    assert tcp_prod.call("metrics")["refusals"] == [
        "consumer uses transport 'cma', this producer serves 'tcp'"]
    # Learned once: the next pull from the tcp producer asks for tcp at once.
    tcp_prod.publish("again", remote)
    _pull_all(cons, tcp_prod.address, "again", remote, local)
    assert cons.metrics()["handshakes"] == 2
    assert len(tcp_prod.call("metrics")["refusals"]) == 1
    # Plain tcp and cma consumers read an auto producer's blocks.
    for name in ("tcp", "cma"):
        other = consumers(name)
        auto_prod.publish(f"by-{name}", remote)
        _pull_all(other, auto_prod.address, f"by-{name}", remote, local)
        assert digest(other.cache, local) == auto_prod.call("digest", remote)
        assert other.metrics()["media"] == {name: 1}


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root (unshare --pid)")
def test_auto_falls_back_to_tcp_across_a_pid_namespace(consumers, caplog):
    """A producer in another PID namespace (a container on this host) cannot
    be read by cma: it refuses, and auto moves the same bytes over tcp."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "helpers" / "pidns_producer.py"
    proc = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, str(script), "auto",
                             "11"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    try:
        address = proc.stdout.readline().strip()
        assert address, "the producer in the new PID namespace did not start"
        cons = consumers("auto")
        caplog.set_level("INFO", logger="kvbridge.transport")
        proc.stdin.write("ns-1\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        _pull_all(cons, address, "ns-1", [0, 1, 2, 3], [8, 9, 10, 11])
        expected = make_cache(16, 11)
        assert digest(cons.cache, [8, 9, 10, 11]) == digest(expected, [0, 1, 2, 3])
        assert cons.metrics()["media"] == {"tcp": 1}
        assert any("one host and in one PID namespace" in r.getMessage()
                   for r in caplog.records if "cma cannot reach" in r.getMessage())
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_auto_resolves_to_nixl_only_where_rdma_is_present(tmp_path):
    from kvbridge.transport import auto

    assert auto.rdma_devices(str(tmp_path / "absent")) == []
    (tmp_path / "mlx5_0").mkdir()
    assert auto.rdma_devices(str(tmp_path)) == ["mlx5_0"]
    assert auto.resolve(True, ["mlx5_0"]) == "nixl"
    assert auto.resolve(False, ["mlx5_0"]) == "auto"   # no nixl installed
    assert auto.resolve(True, []) == "auto"


@pytest.mark.parametrize("name", ["cma", "auto", "nixl"])
def test_large_verified_read_digests_each_group_as_it_lands(name, producers, consumers):
    """A verified read of >= 8 MiB digests groups of blocks as they land
    (landed_digests): cma on the threads that read them, nixl on a digest
    thread while the next piece moves. Every block checks, in block order, and
    a corrupted block is still caught and named."""
    if name not in available():
        pytest.skip(f"{name} is not available here")
    big = dict(num_blocks=48, block_size=128, kv_heads=8, head_size=128)  # 1 MiB blocks
    prod = producers(name, cache_kw=big)
    cons = consumers(name, **big)
    rng = random.Random(3)
    remote, local = rng.sample(range(48), 20), rng.sample(range(48), 20)
    prod.publish("big", remote)
    h = cons.pull(prod.address, "big", remote, local)
    assert h.wait(60) == TransferState.DONE, h.error
    assert h.nbytes == 20 << 20 and h.landed_digests is not None and len(h.landed_digests) == 20
    assert h.landed_digests == checksum.block_digests(cons.cache, local)
    assert digest(cons.cache, local) == prod.call("digest", remote)
    assert cons.metrics()["blocks_verified"] == 20
    flipping = consumers(name, config_kw=dict(fault_flip_byte_every=1), **big)
    prod.publish("bad", remote)
    h = flipping.pull(prod.address, "bad", remote, local)
    assert h.wait(60) == TransferState.FAILED
    assert "checksum mismatch: 1 of 20 blocks" in h.error and h.invalid_local_ids == [local[0]]
