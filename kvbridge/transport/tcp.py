# SPDX-License-Identifier: Apache-2.0
"""The built-in TCP transport: KV bytes on the control connection itself.

Zero intermediate copies on host memory: the producer ``sendmsg``s straight
from its cache blocks (one iovec per run of adjacent blocks) and the consumer
``recvmsg_into``s straight into its destination blocks. Device memory goes
through a pooled (pinned) staging buffer. Several pulls can be in flight on
one connection; replies come back in order.

Tunable: ``KVBRIDGE_TCP_IO_WINDOW_BYTES`` - bytes of buffers handed to one
``sendmsg``/``recvmsg_into`` call [8 MiB].
"""

from __future__ import annotations

import bisect
import itertools
import os
import socket
import time
from collections.abc import Callable

from kvbridge import protocol as P
from kvbridge.cache import checksum
from kvbridge.cache.shard import BlockSlice
from kvbridge.transport.base import Transport
from kvbridge.transport.handle import TransferHandle
from kvbridge.transport.peer import PeerConnection
from kvbridge.transport.server import ServerConn

#: Most buffers one sendmsg/recvmsg_into call takes (Linux IOV_MAX).
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: Bytes of buffers handed to one sendmsg/recvmsg_into call
#: (``KVBRIDGE_TCP_IO_WINDOW_BYTES``, default 8 MiB). One call moves at most a
#: socket buffer's worth, while Python acquires every buffer it is given: a
#: 64 MiB pull of 64 KiB blocks offered all 1024 buffers to each of hundreds
#: of calls. A few socket buffers' worth keeps calls full and cheap.
IO_WINDOW_BYTES = int(os.environ.get("KVBRIDGE_TCP_IO_WINDOW_BYTES", 8 << 20))


class _Window:
    """Where buffer ``i``, byte ``off`` is in a list of buffers, and which
    buffers the next call should be handed (about ``IO_WINDOW_BYTES``)."""

    def __init__(self, bufs: list[memoryview]):
        self.bufs = bufs
        self.ends = list(itertools.accumulate(len(b) for b in bufs))
        self.i = self.off = 0

    def __bool__(self) -> bool:
        return self.i < len(self.bufs)

    def next(self) -> list[memoryview]:
        i = self.i
        start = (self.ends[i - 1] if i else 0) + self.off
        j = bisect.bisect_left(self.ends, start + IO_WINDOW_BYTES, i + 1)
        j = min(j + 1, len(self.bufs), i + IOV_MAX)
        head = self.bufs[i][self.off:] if self.off else self.bufs[i]
        return [head, *self.bufs[i + 1:j]]

    def advance(self, n: int) -> None:
        i, off = self.i, self.off + n
        while i < len(self.bufs) and off >= len(self.bufs[i]):
            off -= len(self.bufs[i])
            i += 1
        self.i, self.off = i, off


def send_buffers(sock: socket.socket, bufs: list[memoryview]) -> None:
    window = _Window([b for b in bufs if len(b)])
    while window:
        window.advance(sock.sendmsg(window.next()))


def recv_buffers(sock: socket.socket, bufs: list[memoryview], stall_s: float,
                 progress: Callable[[int, int], None] | None = None,
                 frames: P.FrameReader | None = None) -> None:
    """Fill ``bufs`` from ``sock`` (first with what ``frames`` read ahead);
    fail if no byte arrives for ``stall_s``. ``progress(i, offset)``, if
    given, hears after each read that buffers before ``i`` are full and buffer
    ``i`` holds ``offset`` bytes."""
    window, last = _Window(bufs), time.monotonic()
    if frames is not None and frames.buffered:
        while window and frames.buffered:
            window.advance(frames.take_into(window.next()[0]))
        if progress is not None:
            progress(window.i, window.off)
    while window:
        try:
            got = sock.recvmsg_into(window.next())[0]
        except socket.timeout:
            if time.monotonic() - last > stall_s:
                raise TimeoutError(f"no data for {stall_s:.0f} s mid-transfer") from None
            continue
        if got == 0:
            raise P.PeerClosed("producer closed the connection mid-transfer")
        last = time.monotonic()
        window.advance(got)
        if progress is not None:
            progress(window.i, window.off)


class TcpTransport(Transport):
    name = "tcp"
    reads_from = ("auto",)

    def _send_pull(self, conn: socket.socket, grant: P.PullGrant, ids: list[int],
                   state: ServerConn, block_slice: BlockSlice | None = None) -> None:
        nbytes = grant.nbytes
        # Grant, data header and data in one sendmsg: a small pull reaches the
        # consumer in one segment, one wake-up.
        head = memoryview(P.encode(grant) + P.data_header(nbytes))
        if self.cache.device.type == "cpu" and block_slice is None:
            send_buffers(conn, [head, *self.cache.block_buffers(ids)])
        else:
            # A TP shard's heads (or device memory): the copy kernel gathers
            # them into one staging buffer, one send.
            staging = self.cache.export_blocks(ids, block_slice=block_slice)
            try:
                send_buffers(conn, [head, memoryview(staging.numpy())])
            finally:
                self.cache.pool.release(staging)
        self.stats.bytes_served += nbytes

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        sock, frames = conn.sock, conn.frames
        assert sock is not None and frames is not None
        kind, length = frames.recv_header()
        if kind != P.KIND_DATA or length != grant.nbytes or length != handle.nbytes:
            raise P.ProtocolError(f"expected {handle.nbytes} data bytes for transfer "
                                  f"{handle.xfer_id}, got a frame of kind {kind} with {length}")
        stall = self.config.transfer_timeout_s
        if handle.cancel_requested:
            # Keep the stream in sync but leave the local blocks alone.
            scratch = self.cache.pool.acquire(length)
            try:
                recv_buffers(sock, [memoryview(scratch.numpy())], stall, frames=frames)
            finally:
                self.cache.pool.release(scratch)
            return False
        local_slice = handle.local_slice
        if self.cache.device.type == "cpu" and local_slice is None:
            landing = (checksum.LandingDigests(self.cache, handle.local_ids)
                       if self._verifies(grant) else None)
            recv_buffers(sock, self.cache.block_buffers(handle.local_ids), stall,
                         landing.progress if landing is not None else None, frames)
            if landing is not None:
                handle.landed_digests = landing.digests(handle.local_ids)
        else:
            # Into a slice of each block (a TP shard's heads) or device memory:
            # land in staging, then the copy kernel scatters.
            staging = self.cache.pool.acquire(length)
            try:
                recv_buffers(sock, [memoryview(staging.numpy())], stall, frames=frames)
                if self._verifies(grant) and checksum.supported(self.cache):
                    handle.landed_digests = checksum.staging_digests(
                        staging.numpy(), len(handle.local_ids), self.layout.num_regions)
                self.cache.import_blocks(staging, handle.local_ids, block_slice=local_slice)
            finally:
                self.cache.pool.release(staging)
        return True
