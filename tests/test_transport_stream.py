# SPDX-License-Identifier: Apache-2.0
"""Streaming, every backend: a producer publishes a request's blocks as its
prefill computes them (``publish_progress``) and a consumer that asked before
any was computed reads them by position, chunk by chunk, as they come.

Real producer processes, real sockets, real memory (``helpers.transport_peer``)."""

from __future__ import annotations

import time

from helpers.transport_peer import digest
from kvbridge.transport import TransferState


def test_chunks_asked_before_prefill_land_as_the_blocks_are_computed(backend, producers,
                                                                      consumers):
    prod = producers(backend)
    cons = consumers(backend)
    remote = [9, 3, 14, 7, 21, 2]          # the producer's blocks, in request order
    local = [30, 31, 5, 6, 40, 41]
    # Decode asks first: two chunks of three blocks, by position.
    first = cons.pull(prod.address, "s1", [0, 1, 2], local[:3], positions=True, final=False)
    last = cons.pull(prod.address, "s1", [3, 4, 5], local[3:], positions=True, final=True)
    time.sleep(0.3)
    assert not first.done() and not last.done(), "granted before any block was computed"
    # Prefill's first step computes two blocks: not yet the first chunk.
    assert prod.call("progress", "s1", remote[:2], False) is True
    time.sleep(0.3)
    assert not first.done()
    # The next step completes the first chunk: it lands, the second still waits.
    assert prod.call("progress", "s1", remote[:4], False) is True
    assert first.wait(10) == TransferState.DONE, first.error
    assert digest(cons.cache, local[:3]) == prod.call("digest", remote[:3])
    assert not last.done()
    assert prod.call("poll") == [], "a partial read let the blocks go"
    assert prod.call("progress", "s1", remote, True) is True
    assert last.wait(10) == TransferState.DONE, last.error
    assert digest(cons.cache, local) == prod.call("digest", remote)
    # The final chunk's read lets the request go, once.
    assert prod.wait_released() == [("s1", "read")]


def test_a_position_past_the_end_of_a_complete_request_is_refused(backend, producers,
                                                                   consumers):
    prod = producers(backend)
    cons = consumers(backend)
    assert prod.call("progress", "s2", [4, 5], True) is True
    h = cons.pull(prod.address, "s2", [1, 2], [7, 8], positions=True)
    assert h.wait(10) == TransferState.FAILED
    assert h.error_code == "blocks" and "outside request" in h.error


def test_a_consumer_that_gives_up_before_prefill_frees_the_request(backend, producers,
                                                                    consumers):
    """Cancelled while parked: refused at once (not at the producer's
    timeout), and a publish that comes later is refused, reported released."""
    prod = producers(backend)
    cons = consumers(backend)
    h = cons.pull(prod.address, "s3", [0, 1], [3, 4], positions=True)
    time.sleep(0.3)
    t0 = time.monotonic()
    h.cancel()
    assert h.wait(5) == TransferState.CANCELLED
    assert time.monotonic() - t0 < 3
    assert prod.wait_released() == [("s3", "released")]
    assert prod.call("progress", "s3", [1, 2], True) is False
    assert prod.call("held") == {}


def test_parked_pull_times_out_at_the_producer(backend, producers, consumers):
    prod = producers(backend, config_kw={"transfer_timeout_s": 1.0})
    cons = consumers(backend)
    h = cons.pull(prod.address, "never", [0], [1], positions=True)
    assert h.wait(10) == TransferState.FAILED
    assert h.error_code == "timeout" and "not computed" in h.error


def test_other_requests_pass_a_parked_one(backend, producers, consumers):
    """A pull parked for one request's prefill never holds up another's."""
    chunk = 3
    prod = producers(backend)
    cons = consumers(backend)
    waiting = cons.pull(prod.address, "slow", list(range(chunk)), list(range(chunk)),
                        positions=True)
    prod.publish("fast", [10, 11])
    h = cons.pull(prod.address, "fast", [10, 11], [20, 21])
    assert h.wait(10) == TransferState.DONE, h.error
    assert not waiting.done()
    prod.call("progress", "slow", list(range(30, 30 + chunk)), True)
    assert waiting.wait(10) == TransferState.DONE, waiting.error
    assert digest(cons.cache, list(range(chunk))) == prod.call(
        "digest", list(range(30, 30 + chunk)))
