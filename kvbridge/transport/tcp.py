# SPDX-License-Identifier: Apache-2.0
"""The built-in TCP transport: KV bytes on the control connection itself.

Zero intermediate copies on host memory: the producer ``sendmsg``s straight
from its cache blocks (one iovec per run of adjacent blocks) and the consumer
``recvmsg_into``s straight into its destination blocks. Device memory goes
through a pooled (pinned) staging buffer. Several pulls can be in flight on
one connection; replies come back in order.
"""

from __future__ import annotations

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


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a buffer list."""
    while n and bufs:
        if n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        else:
            bufs = [bufs[0][n:], *bufs[1:]]
            n = 0
    return bufs


def send_buffers(sock: socket.socket, bufs: list[memoryview]) -> None:
    bufs = [b for b in bufs if len(b)]
    while bufs:
        sent = sock.sendmsg(bufs[:IOV_MAX])
        bufs = _advance(bufs, sent)


def recv_buffers(sock: socket.socket, bufs: list[memoryview], stall_s: float,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Fill ``bufs`` from ``sock``; fail if no byte arrives for ``stall_s``.
    ``progress(i, offset)``, if given, hears after each read that buffers
    before ``i`` are full and buffer ``i`` holds ``offset`` bytes."""
    i, off, last = 0, 0, time.monotonic()
    while i < len(bufs):
        try:
            got = sock.recvmsg_into([bufs[i][off:], *bufs[i + 1:i + IOV_MAX]])[0]
        except socket.timeout:
            if time.monotonic() - last > stall_s:
                raise TimeoutError(f"no data for {stall_s:.0f} s mid-transfer") from None
            continue
        if got == 0:
            raise P.PeerClosed("producer closed the connection mid-transfer")
        last = time.monotonic()
        off += got
        while i < len(bufs) and off >= len(bufs[i]):
            off -= len(bufs[i])
            i += 1
        if progress is not None:
            progress(i, off)


class TcpTransport(Transport):
    name = "tcp"

    def _send_pull(self, conn: socket.socket, grant: P.PullGrant, ids: list[int],
                   state: ServerConn, block_slice: BlockSlice | None = None) -> None:
        nbytes = grant.nbytes
        P.send_message(conn, grant)
        conn.sendall(P.data_header(nbytes))
        if self.cache.device.type == "cpu" and block_slice is None:
            send_buffers(conn, self.cache.block_buffers(ids))
        else:
            # A TP shard's heads (or device memory): the copy kernel gathers
            # them into one staging buffer, one send.
            staging = self.cache.export_blocks(ids, block_slice=block_slice)
            try:
                send_buffers(conn, [memoryview(staging.numpy())])
            finally:
                self.cache.pool.release(staging)
        self.stats.bytes_served += nbytes

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        sock = conn.sock
        assert sock is not None
        kind, length = P.recv_header(sock)
        if kind != P.KIND_DATA or length != grant.nbytes or length != handle.nbytes:
            raise P.ProtocolError(f"expected {handle.nbytes} data bytes for transfer "
                                  f"{handle.xfer_id}, got a frame of kind {kind} with {length}")
        stall = self.config.transfer_timeout_s
        if handle.cancel_requested:
            # Keep the stream in sync but leave the local blocks alone.
            scratch = self.cache.pool.acquire(length)
            try:
                recv_buffers(sock, [memoryview(scratch.numpy())], stall)
            finally:
                self.cache.pool.release(scratch)
            return False
        local_slice = handle.local_slice
        if self.cache.device.type == "cpu" and local_slice is None:
            landing = (checksum.LandingDigests(self.cache, handle.local_ids)
                       if self._verifies(grant) else None)
            recv_buffers(sock, self.cache.block_buffers(handle.local_ids), stall,
                         landing.progress if landing is not None else None)
            if landing is not None:
                handle.landed_digests = landing.digests(handle.local_ids)
        else:
            # Into a slice of each block (a TP shard's heads) or device memory:
            # land in staging, then the copy kernel scatters.
            staging = self.cache.pool.acquire(length)
            try:
                recv_buffers(sock, [memoryview(staging.numpy())], stall)
                if self._verifies(grant) and checksum.supported(self.cache):
                    handle.landed_digests = checksum.staging_digests(
                        staging.numpy(), len(handle.local_ids), self.layout.num_regions)
                self.cache.import_blocks(staging, handle.local_ids, block_slice=local_slice)
            finally:
                self.cache.pool.release(staging)
        return True
