# SPDX-License-Identifier: Apache-2.0
"""A pull as its caller sees it: ``TransferHandle`` and its state machine
``QUEUED -> HANDSHAKING -> TRANSFERRING -> DONE | FAILED | CANCELLED``."""

from __future__ import annotations

import enum
import threading
import time

from kvbridge.cache.shard import BlockSlice
from kvbridge.errors import ErrorCode, TransferError


class TransferState(enum.Enum):
    QUEUED = "queued"
    HANDSHAKING = "handshaking"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.CANCELLED)


class TransferHandle:
    """A pull in progress: pollable (``state``), waitable and awaitable.

    ``await handle`` or ``handle.wait(timeout)`` return the final state;
    ``handle.result()`` raises ``TransferError`` unless it is DONE. A pull that
    did not finish DONE says why in ``error`` (for people) and ``error_code``
    (an ``ErrorCode``, for code).
    """

    def __init__(self, xfer_id: int, peer: str, request_id: str, remote_ids: list[int],
                 local_ids: list[int], nbytes: int, remote_slice: BlockSlice | None = None,
                 local_slice: BlockSlice | None = None, readers: int = 1):
        self.xfer_id = xfer_id
        self.peer = peer
        self.request_id = request_id
        self.remote_ids = remote_ids
        self.local_ids = local_ids
        self.nbytes = nbytes
        #: the part of each remote block read, and of each local block written
        #: (a TP shard's heads, ``kvbridge.cache.shard``); None: whole blocks
        self.remote_slice = remote_slice
        self.local_slice = local_slice
        #: consumer ranks reading this request from this producer
        self.readers = readers
        self.state = TransferState.QUEUED
        self.error: str | None = None
        self.error_code: ErrorCode | None = None
        self.created = time.monotonic()
        #: when each stage of this pull ended, ``time.perf_counter()`` seconds
        #: (CLOCK_MONOTONIC on Linux, so comparable with a producer's on the
        #: same host): "pull" (created), "asked" (Pull encoded, about to be written), "granted" (the
        #: grant read), "landed" (bytes in place), "verified", "read_done"
        #: (ReadDone written), "done" (the handle finished DONE). Where a pull's
        #: fixed cost goes; ``kvbridge bench transport`` shows it per stage.
        self.marks: dict[str, float] = {"pull": time.perf_counter()}
        self.started: float | None = None
        self.finished_at: float | None = None
        self.cancel_requested = False
        #: blocks whose checksum did not match (a subset of ``local_ids``)
        self.invalid_local_ids: list[int] = []
        #: digests of ``local_ids`` a backend computed while the bytes landed
        #: (cache-warm); None: ``_verify`` reads the blocks again
        self.landed_digests: list[int] | None = None
        #: the producer process this pull is meant for (``Transport.instance_id``
        #: there): a restarted producer fails the pull at once
        self.producer_instance: str | None = None
        #: a read by block position of a streamed request, and whether it is
        #: its reader's last (``Transport.pull``)
        self.positions = False
        self.final = True
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._cancel_cb = None
        #: called once when the handle finishes (the transport's progress event)
        self._on_finish = None

    def __repr__(self) -> str:
        return (f"TransferHandle(xfer={self.xfer_id}, req={self.request_id!r}, peer={self.peer}, "
                f"{self.state.value}" + (f", error={self.error!r}" if self.error else "") + ")")

    # -- state machine (transport side) --
    def _advance(self, state: TransferState, error: str | None = None,
                 code: ErrorCode | None = None) -> bool:
        """Move to ``state``; False if already finished. A finished state
        records ``error`` and its ``code`` (a cancel is always CANCELLED)."""
        with self._lock:
            if self.state.finished:
                return False
            self.state = state
            if state == TransferState.TRANSFERRING and self.started is None:
                self.started = time.monotonic()
            if state.finished:
                if state == TransferState.DONE:
                    self.marks["done"] = time.perf_counter()
                self.error = error
                self.error_code = (None if state == TransferState.DONE
                                   else ErrorCode.CANCELLED if state == TransferState.CANCELLED
                                   else code or ErrorCode.TRANSFER)
                self.finished_at = time.monotonic()
                self._event.set()
        if state.finished and self._on_finish is not None:
            self._on_finish()
        return True

    def _mark(self, stage: str) -> None:
        self.marks[stage] = time.perf_counter()

    def _set_error(self, error: str, code: ErrorCode) -> None:
        """A backend's reason the bytes did not land (before the handle finishes)."""
        self.error, self.error_code = error, code

    # -- user side --
    def done(self) -> bool:
        return self.state.finished

    def wait(self, timeout: float | None = None) -> TransferState:
        self._event.wait(timeout)
        return self.state

    def result(self, timeout: float | None = None) -> None:
        if not self._event.wait(timeout):
            raise TimeoutError(f"transfer {self.xfer_id} still {self.state.value}")
        if self.state != TransferState.DONE:
            raise TransferError(f"transfer {self.xfer_id} of request {self.request_id!r} "
                                f"{self.state.value}: {self.error}",
                                self.error_code or ErrorCode.TRANSFER)

    def __await__(self):
        import asyncio

        return asyncio.get_running_loop().run_in_executor(None, self.wait).__await__()

    def cancel(self) -> bool:
        """Ask to stop. True if no byte will be written to the local blocks
        (already CANCELLED); a transfer mid-flight stops at the next safe point
        and then turns CANCELLED."""
        self.cancel_requested = True
        if self.state == TransferState.QUEUED or self.state == TransferState.HANDSHAKING:
            self._advance(TransferState.CANCELLED, "cancelled before transfer")
        elif self._cancel_cb is not None and not self.state.finished:
            self._cancel_cb(self)
        return self.state == TransferState.CANCELLED

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None or self.started is None:
            return None
        return self.finished_at - self.started
