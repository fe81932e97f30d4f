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
    #: False while a streamed request (``advance``) may still grow: a
    #: positional read past its end waits instead of failing
    complete: bool = True


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

    def advance(self, request_id: str, block_ids: Sequence[int], complete: bool,
                lease_s: float | None = None, digests: Sequence[int] | None = None) -> bool:
        """Hold the blocks of a request still being computed (streaming):
        ``block_ids`` are every block ready so far, in request order, and
        extend what an earlier call held; ``complete`` says no more will come.
        ``digests``: of the blocks this call adds. False (nothing changes) if
        the request has ended - a consumer released it, or it was read."""
        with self._lock:
            held = self._leases.get(request_id)
            if held is None:
                if request_id in self._ended:
                    return False
                held = self._leases[request_id] = _Lease(
                    request_id, [], time.monotonic() + (lease_s or self.lease_s),
                    digests=None if digests is None else {}, complete=False)
            n = len(held.block_ids)
            if list(block_ids[:n]) != held.block_ids:
                raise ValueError(f"request {request_id!r} is already published with other "
                                 "blocks")
            added = list(block_ids[n:])
            if held.digests is not None and digests is not None:
                held.digests.update(zip(added, digests))
            held.block_ids.extend(added)
            held.complete = held.complete or complete
            # A streamed lease waits for its consumer from its last block on.
            held.expires = time.monotonic() + (lease_s or self.lease_s)
            return True

    def begin_positional_read(self, request_id: str, positions: Sequence[int],
                              readers: int = 1) -> tuple[list[int], list[int]]:
        """``begin_read`` by position in the request's block list (a consumer
        that reads a streamed request does not know the producer's block ids).
        Returns (block ids, digests). Raises ``UnknownRequestError``
        ``not_published`` while the request, or a position asked, is not held
        yet but may still be; ``BlockIdError`` for a position past the end of
        a complete request."""
        with self._lock:
            lease = self._held(request_id)
            n = len(lease.block_ids)
            if len(set(positions)) != len(positions):
                raise BlockIdError(f"duplicate block positions in a read of {request_id!r}")
            bad = [p for p in positions if p < 0 or (lease.complete and p >= n)]
            if bad:
                raise BlockIdError(f"block positions {bad[:8]} are outside request "
                                   f"{request_id!r}, which has {n} blocks")
            if any(p >= n for p in positions):
                raise UnknownRequestError(f"blocks of request {request_id!r} are not "
                                          f"computed yet ({n} are)", "not_published")
            ids = [lease.block_ids[p] for p in positions]
            lease.readers += 1
            lease.reads_expected = max(lease.reads_expected, readers)
            return ids, ([lease.digests[b] for b in ids] if lease.digests is not None else [])

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

    def _held(self, request_id: str) -> _Lease:
        """The lease of ``request_id`` (lock held); raises ``UnknownRequestError``
        ``ended`` if it was let go, ``not_published`` if it may still come."""
        lease = self._leases.get(request_id)
        if lease is None:
            ended = self._ended.get(request_id)
            if ended:
                raise UnknownRequestError(
                    f"unknown request id {request_id!r}: its blocks were already {ended}",
                    "ended")
            raise UnknownRequestError(f"unknown request id {request_id!r}: not published "
                                      "(yet?)", "not_published")
        return lease

    def begin_read(self, request_id: str, block_ids: Sequence[int],
                   readers: int = 1) -> list[int]:
        """Grant a read of ``block_ids`` of ``request_id``; raises if not allowed.
        Returns the blocks' digests in that order (empty: not checksummed).
        ``readers``: consumer ranks that each read it once (the blocks are
        held until that many reads succeeded)."""
        with self._lock:
            lease = self._held(request_id)
            allowed = set(lease.block_ids)
            stray = [b for b in block_ids if b not in allowed]
            if stray:
                raise BlockIdError(f"blocks {stray[:8]} are not published for request "
                                   f"{request_id!r}")
            lease.readers += 1
            lease.reads_expected = max(lease.reads_expected, readers)
            return [lease.digests[b] for b in block_ids] if lease.digests is not None else []

    def end_read(self, request_id: str, ok: bool, counts: bool = True) -> None:
        """A granted read ended. ``counts``: False for a read of part of a
        request (a streamed one, read in chunks): only the reader's last
        counts toward letting the blocks go."""
        with self._lock:
            lease = self._leases.get(request_id)
            if lease is None:
                return
            lease.readers = max(0, lease.readers - 1)
            if ok and not counts:
                return
            if ok:
                lease.reads_done += 1
                if lease.reads_done >= lease.reads_expected:
                    self._release_locked(request_id, "read")
            elif lease.readers == 0 and time.monotonic() >= lease.expires:
                self._release_locked(request_id, "expired")

    def release(self, request_id: str, before_publish: bool = False) -> bool:
        """The engine lets go (abort, or it is done); True if it was held.

        ``before_publish``: a consumer's hand-back may come before a streamed
        request was published (decode gave up while prefill still ran): the
        request is then ended unpublished, so its later publish is refused and
        reported released instead of held until the lease runs out."""
        with self._lock:
            if request_id not in self._leases:
                if before_publish and request_id not in self._ended:
                    self._release_locked(request_id, "released")
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

    def num_held(self, request_id: str) -> int:
        """How many blocks of ``request_id`` are held (0: none, or ended)."""
        with self._lock:
            lease = self._leases.get(request_id)
            return len(lease.block_ids) if lease is not None else 0

    def held(self) -> dict[str, list[int]]:
        with self._lock:
            return {rid: list(lease.block_ids) for rid, lease in self._leases.items()}

