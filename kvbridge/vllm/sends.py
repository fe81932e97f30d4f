# SPDX-License-Identifier: Apache-2.0
"""Producer side of the worker (``KVBridgeWorker``'s rule 4): which requests
vLLM handed over and waits to hear sent, publishing streamed requests step by
step, and turning the transport's lease events into ``finished_sending``."""

from __future__ import annotations

from collections import OrderedDict

from vllm.logger import init_logger

from kvbridge.agent import KVAgent
from kvbridge.vllm.metadata import StreamSpec
from kvbridge.vllm.stats import KVBridgeKVConnectorStats

logger = init_logger(__name__)

#: lease events kept for requests whose hand-over this worker has not seen yet
MAX_EARLY_RELEASES = 8192


class SendTracker:
    """Rule 4: a request is reported ``finished_sending`` exactly once, only
    after vLLM handed it over (``SendSpec``), and once no consumer can read
    its blocks any more: read, released, expired, or refused.

    A request is leased under its request id (the scheduler published it)
    or, streamed, under its stream id (``publish_step`` published it)."""

    def __init__(self) -> None:
        #: lease id -> request id, until reported sent
        self.sending: dict[str, str] = {}
        #: lease id -> reason, released before this worker's step saw the
        #: hand-over (the scheduler publishes ahead of the step; a consumer may
        #: give a streamed request up before prefill scheduled it)
        self._released_early: OrderedDict[str, str] = OrderedDict()
        #: request ids to report sent at the next poll
        self._done: set[str] = set()
        #: streamed requests' blocks the current step computes
        self._step: dict[str, StreamSpec] = {}

    def __bool__(self) -> bool:
        return bool(self.sending)

    def start_step(self, streams: dict[str, StreamSpec]) -> None:
        self._step = streams

    def publish_step(self, agent: KVAgent, stats: KVBridgeKVConnectorStats) -> None:
        """After the step's forward pass: each streamed request's blocks it
        computed are readable now (``kvbridge.vllm.stream``)."""
        steps, self._step = self._step, {}
        for req_id, spec in steps.items():
            try:
                agent.publish_progress(spec.stream_id, spec.block_ids, complete=spec.complete)
                stats.bump("num_stream_publishes")
            except Exception as e:  # noqa: BLE001 - never the engine's failure
                # Preempted and rescheduled on other blocks, or staging failed:
                # its consumer must not read these blocks; it fails and recomputes.
                logger.error("KVBridgeConnector: streamed request %s (%s) cannot be "
                             "published: %s; its consumer's load fails", req_id,
                             spec.stream_id, e)
                agent.release(spec.stream_id, before_publish=True)

    def start(self, agent: KVAgent | None, req_id: str, stream_id: str | None = None,
              aborted: bool = False) -> bool:
        """vLLM handed the request over; from here only wait for the
        transport to let its blocks go. ``agent`` None: the transport is
        closed (sleep mode), nothing can read them. A streamed request vLLM
        aborted is let go now (a consumer reading it is refused). False if it
        was handed over already."""
        lease_id = stream_id or req_id
        if lease_id in self.sending:
            return False
        if agent is None or self._released_early.pop(lease_id, None) is not None:
            # Closed, or read (or released) before this step's metadata arrived.
            self._done.add(req_id)
            return True
        self.sending[lease_id] = req_id
        if aborted:
            agent.release(lease_id, before_publish=True)
        return True

    def poll(self, agent: KVAgent | None, stats: KVBridgeKVConnectorStats) -> set[str]:
        """Requests to report ``finished_sending`` now."""
        done, self._done = self._done, set()
        if agent is None:
            return done
        for lease_id, reason in agent.poll_released():
            if reason == "expired":
                stats.bump("num_expired_leases")
            if lease_id in self.sending:
                done.add(self.sending.pop(lease_id))
            else:
                self._released_early[lease_id] = reason
                while len(self._released_early) > MAX_EARLY_RELEASES:
                    self._released_early.popitem(last=False)
        return done

    def drop_all(self) -> int:
        """The transport closed (sleep mode): every request handed over is
        reported sent at the next poll. Returns how many."""
        n = len(self.sending)
        self._done |= set(self.sending.values())
        self.sending.clear()
        self._released_early.clear()
        self._step = {}
        return n
