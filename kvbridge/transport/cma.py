# SPDX-License-Identifier: Apache-2.0
"""Same-host transport: the consumer reads the producer's blocks directly.

``process_vm_readv`` (Linux cross-memory attach, what UCX's ``cma`` transport
uses) copies from another process's address space into ours in one kernel
call per batch of iovecs: producer block -> consumer block, no staging copy and
no socket. The control connection still authenticates, checks layouts and
grants each read, so the producer's lease rules hold exactly as for TCP.

Requirements: both processes on one host, in one PID namespace, and the
consumer allowed to ptrace-read the producer (same user; under Yama
``ptrace_scope=1`` the producer opts in with ``PR_SET_PTRACER``, which this
backend does). The handshake refuses the pairing with the reason otherwise.
Host memory only.

Tunables: ``KVBRIDGE_CMA_THREADS`` - threads splitting one large read
[min(4, the CPUs this process may run on)]; reads under 8 MiB use one.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

from kvbridge import protocol as P
from kvbridge.cache import checksum
from kvbridge.cache.blocks import run_starts
from kvbridge.cache.kernels import thread_count, threads_from_env
from kvbridge.cache.shard import BlockSlice, paired_slices
from kvbridge.errors import ErrorCode
from kvbridge.transport.base import Transport
from kvbridge.transport.direct import (
    check_grant,
    parse_regions,
    region_info,
    send_grant,
)
from kvbridge.transport.handle import TransferHandle
from kvbridge.transport.peer import PeerConnection
from kvbridge.transport.server import ServerConn

_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.process_vm_readv
_readv.restype = ctypes.c_ssize_t
_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                   ctypes.c_ulong, ctypes.c_ulong]
PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value
IOV_BATCH = 1024
#: ``KVBRIDGE_CMA_THREADS``: threads one large read is split across [unset:
#: the CPUs this process may run on, at most 4].
THREADS = threads_from_env("KVBRIDGE_CMA_THREADS")


def read_threads() -> int:
    return thread_count(THREADS, 4)


PARALLEL_MIN_BYTES = 8 << 20
#: A large verified read of whole blocks is digested after at most this many
#: bytes landed, while they are in the core's L2 cache (1 MiB per core on the
#: test machine): 64 MiB read at 20-21 GB/s with 256 KiB, 17 with 1 MiB, 22
#: without digests (``csrc/cpu/kvb_cma.cpp``).
DIGEST_CHUNK_BYTES = 256 << 10
#: Verified reads of whole blocks from this size up are read and digested in
#: C (``_read_and_digest``); below it the Python path costs less than the call
NATIVE_READ_MIN_BYTES = 256 << 10
#: Reads of at most this many runs (and under PARALLEL_MIN_BYTES) build their
#: iovecs in plain Python
SMALL_READ_RUNS = 256


def host_identity() -> dict:
    """What must match for two processes to read each other's memory by pid."""
    def read(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"boot_id": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _iov_array(spans):
    """struct iovec[] (void *base, size_t len) of ``spans``: (array, count,
    total bytes); the array passes as a pointer (keep it referenced through
    the call). A short Python list goes through ctypes, which costs less than
    numpy's conversions there."""
    if isinstance(spans, np.ndarray):
        a = np.ascontiguousarray(spans, dtype=np.uint64).reshape(-1, 2)
        return a.ctypes.data_as(ctypes.c_void_p), len(a), int(a[:, 1].sum())
    flat = [x for span in spans for x in span]
    return (ctypes.c_uint64 * len(flat))(*flat), len(spans), sum(flat[1::2])


def read_remote(pid: int, local, remote) -> None:
    """One process_vm_readv; raises OSError unless every byte arrived."""
    (liov, nl, want), (riov, nr, _) = _iov_array(local), _iov_array(remote)
    got = _readv(pid, liov, nl, riov, nr, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")
    if got != want:
        raise OSError(errno.EIO, f"process_vm_readv from pid {pid}: short read {got} of {want}")


class CmaTransport(Transport):
    name = "cma"
    reads_from = ("auto",)

    @staticmethod
    def is_available() -> bool:
        return os.path.exists("/proc/self/ns/pid") and hasattr(_libc, "process_vm_readv")

    def __init__(self, cache, config=None, **kw):
        if cache.device.type != "cpu":
            raise ValueError("the cma transport reads host memory only; use nixl for devices")
        super().__init__(cache, config, **kw)

    # -- producer --
    def _start_producer(self) -> None:
        # Let same-user consumers read us under Yama ptrace_scope=1.
        try:
            _libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY), 0, 0, 0)
        except Exception:  # noqa: BLE001 - not Linux/Yama: nothing to do
            pass

    def _server_info(self) -> dict:
        return {"pid": os.getpid(), **host_identity(), **region_info(self.cache)}

    def _client_info(self) -> dict:
        return host_identity()

    def _server_accept_peer(self, info: dict, medium: str):
        mine = host_identity()
        if info.get("boot_id") != mine["boot_id"] or info.get("pidns") != mine["pidns"]:
            raise ValueError("the cma transport needs both processes on one host and in one "
                             "PID namespace; use tcp or nixl across hosts")
        return None

    def _send_pull(self, conn, grant: P.PullGrant, ids: list[int], state: ServerConn,
                   block_slice=None) -> None:
        send_grant(self, conn, grant)

    # -- consumer --
    def _connect_data(self, conn: PeerConnection):
        info = conn.remote_info
        mine = host_identity()
        if info.get("boot_id") != mine["boot_id"] or info.get("pidns") != mine["pidns"]:
            raise ValueError("producer is not on this host / PID namespace")
        pid = int(info["pid"])
        regions, num_blocks = parse_regions(info)
        # Probe once so a permission problem is a handshake error, not a failed pull.
        probe = ctypes.create_string_buffer(1)
        try:
            read_remote(pid, [(ctypes.addressof(probe), 1)], [(regions[0][0], 1)])
        except OSError as e:
            raise PermissionError(
                f"cannot read producer pid {pid}'s memory ({e.strerror}); the cma transport "
                "needs the same user and ptrace permission (see /proc/sys/kernel/yama/"
                "ptrace_scope) - use tcp or nixl instead") from None
        return {"pid": pid, "regions": regions, "num_blocks": num_blocks}

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        data = conn.data
        if not check_grant(handle, grant, data["num_blocks"]):
            return False
        try:
            remote_sl, local_sl = paired_slices(handle.remote_slice, handle.local_slice,
                                                conn.remote_layout.block_bytes,
                                                self.layout.block_bytes)
        except ValueError as e:
            handle._set_error(f"TP slices do not pair: {e}", ErrorCode.LAYOUT)
            return False
        threads = read_threads() if handle.nbytes >= PARALLEL_MIN_BYTES else 1
        if (handle.nbytes >= NATIVE_READ_MIN_BYTES and handle.local_slice is None
                and handle.remote_slice is None
                and self._verifies(grant) and checksum.NATIVE is not None
                and conn.remote_layout.block_bytes == self.layout.block_bytes
                and len(data["regions"]) == self.layout.num_regions <= IOV_BATCH):
            return self._read_and_digest(data, handle, threads)
        batches = self._batches(data["regions"], conn.remote_layout.block_bytes, remote_sl,
                                handle.remote_ids, local_sl, handle.local_ids, threads)
        try:
            def share(lo: int, count: int) -> None:
                for local, remote in batches[lo:lo + count]:
                    read_remote(data["pid"], local, remote)

            checksum.run_shares(share, len(batches), threads)
        except OSError as e:
            handle._set_error(f"reading producer memory failed: {e.strerror or e}",
                              ErrorCode.TRANSFER)
            return False
        return True

    def _read_and_digest(self, data: dict, handle: TransferHandle, threads: int) -> bool:
        """Whole blocks split across `threads` threads, each share read and
        digested piece by piece in C (``kvb_cma_read_blocks``: each piece is
        digested right after it landed, still in the core's cache, without the
        GIL); the digests become ``handle.landed_digests``."""
        lib, api = checksum.NATIVE
        pid = data["pid"]
        seg, regions = self.layout.block_bytes, self.layout.num_regions
        # region-major: region r of block i at [r * n + i], on both sides
        local = self.cache.run_starts(handle.local_ids, None)
        remote = run_starts(data["regions"], seg, handle.remote_ids, None)
        n = len(handle.local_ids)
        digests = np.empty(n, dtype=np.uint64)

        def share(lo: int, count: int) -> None:
            rc = lib.kvb_cma_read_blocks(pid, local[lo:].ctypes.data, remote[lo:].ctypes.data, n,
                                         count, regions, seg, DIGEST_CHUNK_BYTES, api,
                                         digests[lo:].ctypes.data)
            if rc:
                raise OSError(-rc, f"process_vm_readv from pid {pid}: {os.strerror(-rc)}")

        try:
            checksum.run_shares(share, n, threads)
        except OSError as e:
            handle._set_error(f"reading producer memory failed: {e.strerror or e}",
                              ErrorCode.TRANSFER)
            return False
        handle.landed_digests = digests.tolist()
        return True

    def _batches(self, remote_regions, remote_block_bytes: int, remote_sl: BlockSlice,
                 remote_ids, local_sl: BlockSlice, local_ids, threads: int = 1):
        """(local iovecs, remote iovecs) batches of at most IOV_BATCH entries;
        with ``threads`` > 1 (a large read), at least one batch per thread.

        Run ``k`` of remote block ``remote_ids[i]`` pairs with run ``k`` of
        local block ``local_ids[i]`` (``paired_slices``); pairs adjacent on
        both sides merge into one iovec each.
        """
        runs = len(local_ids) * local_sl.rows * self.layout.num_regions
        if runs <= SMALL_READ_RUNS and runs * local_sl.length < PARALLEL_MIN_BYTES:
            # (a large read of few runs still splits across threads below)
            return [self._small_batch(remote_regions, remote_block_bytes, remote_sl,
                                      remote_ids, local_sl, local_ids)]
        length = np.uint64(local_sl.length)
        local = self.cache.run_starts(local_ids, local_sl)
        remote = run_starts(remote_regions, remote_block_bytes, remote_ids, remote_sl)
        if not len(local):
            return []
        # A new iovec wherever either side is not contiguous with the last.
        brk = np.ones(len(local), dtype=bool)
        brk[1:] = (local[1:] != local[:-1] + length) | (remote[1:] != remote[:-1] + length)
        starts = np.flatnonzero(brk)
        sizes = np.diff(np.append(starts, len(local))).astype(np.uint64) * length
        lspans = np.stack([local[starts], sizes], axis=1)
        rspans = np.stack([remote[starts], sizes], axis=1)
        per = IOV_BATCH
        if threads > 1:
            # A large read: one batch per thread, so the reads run in parallel.
            per = max(1, min(IOV_BATCH, -(-len(lspans) // threads)))
        return [(lspans[i:i + per], rspans[i:i + per]) for i in range(0, len(lspans), per)]

    def _small_batch(self, remote_regions, remote_block_bytes: int, remote_sl: BlockSlice,
                     remote_ids, local_sl: BlockSlice, local_ids):
        """``_batches`` for a read of few runs, in plain Python: the same
        iovecs without numpy's per-call cost (which dominated a 4 KiB pull)."""
        lrow = local_sl.row_bytes(self.layout.block_bytes)
        rrow = remote_sl.row_bytes(remote_block_bytes)
        length, rows = local_sl.length, local_sl.rows
        lspans: list[list[int]] = []
        rspans: list[list[int]] = []
        for (lbase, lstride, _), (rbase, rstride) in zip(self.cache.region_addresses(),
                                                         remote_regions):
            for lb, rb in zip(local_ids, remote_ids):
                laddr = lbase + int(lb) * lstride + local_sl.offset
                raddr = rbase + int(rb) * rstride + remote_sl.offset
                for k in range(rows):
                    la, ra = laddr + k * lrow, raddr + k * rrow
                    if lspans and lspans[-1][0] + lspans[-1][1] == la \
                            and rspans[-1][0] + rspans[-1][1] == ra:
                        lspans[-1][1] += length
                        rspans[-1][1] += length
                    else:
                        lspans.append([la, length])
                        rspans.append([ra, length])
        return lspans, rspans
