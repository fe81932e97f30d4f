# SPDX-License-Identifier: Apache-2.0
"""The producer's leases: which published requests' blocks are held for a
consumer, who is reading them, and why each was let go."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvbridge.cache.blocks import BlockIdError
from kvbridge.errors import UnknownRequestError

logger = logging.getLogger("kvbridge.transport")


@dataclass
class _Lease:
    request_id: str
    block_ids: list[int]
    expires: float
    readers: int = 0
    read: bool = False
    #: successful reads to wait for (several consumer TP ranks each read a
    #: slice), and those done
    reads_expected: int = 1
    reads_done: int = 0
    #: block id -> digest (``kvbridge.cache.checksum``), None when not checksummed
    digests: dict[int, int] | None = None


class LeaseTable:
    """Blocks a producer holds for consumers, and why each was let go.

    A request is released exactly once, with reason ``"read"``, ``"expired"``,
    ``"released"`` (the engine let go of it: aborted, or freed by hand) or
    ``"refused"`` (its publish failed: it was never readable).
    ``poll_released`` hands those events to the engine, which frees the blocks.
    """

    def __init__(self, lease_s: float, on_release: Callable[[], None] | None = None):
        self.lease_s = lease_s
        #: called (under the table's lock: keep it trivial) on every release
        self.on_release = on_release
        self._leases: dict[str, _Lease] = {}
        self._events: deque[tuple[str, str]] = deque()
        #: recently ended requests -> reason, so a late read is told "gone",
        #: not "not yet published" (bounded: the oldest are forgotten)
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def publish(self, request_id: str, block_ids: Sequence[int],
                lease_s: float | None = None, digests: Sequence[int] | None = None) -> bool:
        """Hold ``block_ids``; False (and nothing changes) if the request is
        held already or has ended - a publish repeated after a read, a release
        or a refusal must never resurrect freed blocks."""
        with self._lock:
            held = self._leases.get(request_id)
            if held is not None:
                if held.block_ids != list(block_ids):
                    raise ValueError(f"request {request_id!r} is already published with "
                                     f"other blocks")
                return False
            if request_id in self._ended:
                return False
            self._leases[request_id] = _Lease(
                request_id, list(block_ids), time.monotonic() + (lease_s or self.lease_s),
                digests=None if digests is None else dict(zip(block_ids, digests)))
            return True

    def refuse(self, request_id: str) -> bool:
        """A publish of ``request_id`` failed before it was held: report it
        released (``"refused"``) so the engine frees its blocks, and tell a
        consumer that reads it that it is gone. False if it is held or ended."""
        with self._lock:
            if request_id in self._leases or request_id in self._ended:
                return False
            self._release_locked(request_id, "refused")
            return True

    def known(self, request_id: str) -> bool:
        """Whether ``request_id`` is held or has ended (a publish would be a no-op)."""
        with self._lock:
            return request_id in self._leases or request_id in self._ended

    def begin_read(self, request_id: str, block_ids: Sequence[int],
                   readers: int = 1) -> list[int]:
        """Grant a read of ``block_ids`` of ``request_id``; raises if not allowed.
        Returns the blocks' digests in that order (empty: not checksummed).
        ``readers``: consumer ranks that each read it once (the blocks are
        held until that many reads succeeded)."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                ended = self._ended.get(request_id)
                if ended:
                    raise UnknownRequestError(
                        f"unknown request id {request_id!r}: its blocks were already {ended}",
                        "ended")
                raise UnknownRequestError(f"unknown request id {request_id!r}: not published "
                                          "(yet?)", "not_published")
            allowed = set(lease.block_ids)
            stray = [b for b in block_ids if b not in allowed]
            if stray:
                raise BlockIdError(f"blocks {stray[:8]} are not published for request "
                                   f"{request_id!r}")
            lease.readers += 1
            lease.reads_expected = max(lease.reads_expected, readers)
            return [lease.digests[b] for b in block_ids] if lease.digests is not None else []

    def end_read(self, request_id: str, ok: bool) -> None:
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return
            lease.readers = max(0, lease.readers - 1)
            if ok:
                lease.reads_done += 1
                if lease.reads_done >= lease.reads_expected:
                    self._release_locked(request_id, "read")
            elif lease.readers == 0 and time.monotonic() >= lease.expires:
                self._release_locked(request_id, "expired")

    def release(self, request_id: str) -> bool:
        """The engine lets go (abort, or it is done); True if it was held."""
        with self._lock:
            if request_id not in self._leases:
                return False
            self._release_locked(request_id, "released")
            return True

    def expire(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        out = []
        with self._lock:
            for rid, lease in list(self._leases.items()):
                if lease.expires <= now and lease.readers == 0:
                    logger.warning("kvbridge: lease of request %s expired after %.1f s unread; "
                                   "releasing its %d blocks", rid, self.lease_s,
                                   len(lease.block_ids))
                    self._release_locked(rid, "expired")
                    out.append(rid)
        return out

    def _release_locked(self, request_id: str, reason: str) -> None:
        self._leases.pop(request_id, None)
        self._events.append((request_id, reason))
        if self.on_release is not None:
            self.on_release()
        self._ended[request_id] = {"read": "read", "expired": "expired by lease",
                                   "released": "released",
                                   "refused": "refused at publish"}[reason]
        while len(self._ended) > 8192:
            self._ended.popitem(last=False)

    def poll(self) -> list[tuple[str, str]]:
        """(request_id, reason) released since the last poll."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    def held(self) -> dict[str, list[int]]:
        with self._lock:
            return {rid: list(lease.block_ids) for rid, lease in self._leases.items()}

