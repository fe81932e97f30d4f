# SPDX-License-Identifier: Apache-2.0
"""``NixlTransport``: the control protocol of every backend, with each granted
pull moved by NIXL READs the consumer's reader thread starts (``agent.py``)
over prepped descriptor lists (``descriptors.py``). See the package docstring."""

from __future__ import annotations

import itertools
import logging
import queue
import select
import socket
import threading
import time
from collections import deque

from kvbridge import protocol as P
from kvbridge.cache import checksum
from kvbridge.cache.shard import paired_slices
from kvbridge.errors import ErrorCode
from kvbridge.transport.base import Transport
from kvbridge.transport.direct import (
    check_grant,
    parse_regions,
    region_info,
    send_grant,
)
from kvbridge.transport.handle import TransferHandle
from kvbridge.transport.nixl.agent import _IMPORT_ERROR, AgentThread, Read
from kvbridge.transport.nixl.config import (
    BACKEND,
    CLOSE_GRACE_S,
    LIVENESS_S,
    PIECE_BYTES,
    PIECE_MIN_BYTES,
)
from kvbridge.transport.nixl.descriptors import (
    PeerData,
    agent_key,
    agent_label,
    block_descs,
    read_indices,
)
from kvbridge.transport.peer import PeerConnection
from kvbridge.transport.server import ServerConn

logger = logging.getLogger("kvbridge.transport")


class NixlTransport(Transport):
    name = "nixl"

    @staticmethod
    def is_available() -> bool:
        return _IMPORT_ERROR is None

    def __init__(self, cache, config=None, **kw):
        if _IMPORT_ERROR is not None:
            raise ImportError(f"the nixl transport needs the nixl package: {_IMPORT_ERROR}")
        super().__init__(cache, config, **kw)
        if cache.device.type == "cuda":
            self._mem_type = "VRAM"
            self._dev_id = (cache.device.index if cache.device.index is not None
                            else _current_cuda_device())
        elif cache.device.type == "cpu":
            self._mem_type, self._dev_id = "DRAM", 0
        else:
            raise ValueError(f"the nixl transport reads cpu or cuda memory, not "
                             f"{cache.device.type}")
        # producer
        self._prod: AgentThread | None = None
        self._prod_md: bytes = b""
        self._notifs = 0
        #: consumer connections this producer granted reads to; their
        #: ``granted`` dicts say whether one is outstanding (poll fast then)
        self._serving: dict[int, ServerConn] = {}  # id() -> conn (unhashable)
        # consumer
        self._cons_name = f"{self.agent_name}-pull"
        self._cons: AgentThread | None = None
        self._cons_lock = threading.Lock()
        #: remote agent name -> peer connections using it (a producer may be
        #: reached at two addresses, or reconnected before the old one is gone)
        self._remotes: dict[bytes, int] = {}
        self._peer_data: set[PeerData] = set()
        #: the consumer's registration and local descriptor list
        self._local_state: dict = {}

    # ------------------------------------------------------------------ memory
    def _register(self, agent):
        """Register every region of the cache (one descriptor each)."""
        return agent.register_memory([(addr, total, self._dev_id, "") for addr, _, total in
                                      self.cache.region_addresses()], self._mem_type)

    def _slice_dlists(self, data: PeerData, handle: TransferHandle):
        """(local dlist, remote dlist, runs per block) for this pull's slices:
        the whole-block lists made at connect time, or lists over the runs
        of a TP slice, made once per slice shape and kept."""
        if handle.remote_slice is None and handle.local_slice is None:
            return self._local_state["local"], data.remote_dlist, 1
        remote_sl, local_sl = paired_slices(handle.remote_slice, handle.local_slice,
                                            data.block_bytes, self.layout.block_bytes)
        local_key = ("local", local_sl.offset, local_sl.length, local_sl.rows)
        remote_key = (remote_sl.offset, remote_sl.length, remote_sl.rows)
        if local_key not in self._local_state or remote_key not in data.slice_dlists:
            regions = [(a, s) for a, s, _ in self.cache.region_addresses()]

            def prep(agent):
                if local_key not in self._local_state:
                    self._local_state[local_key] = agent.prep_xfer_dlist(
                        "NIXL_INIT_AGENT", block_descs(regions, self.cache.num_blocks, self._dev_id,
                                                        self.layout.block_bytes, local_sl),
                        self._mem_type)
                if remote_key not in data.slice_dlists:
                    data.slice_dlists[remote_key] = agent.prep_xfer_dlist(
                        agent_key(data.remote_agent),
                        block_descs(data.regions, data.num_blocks, data.dev_id,
                                    data.block_bytes, remote_sl), data.mem_type)

            self._cons.call(prep)
        return self._local_state[local_key], data.slice_dlists[remote_key], local_sl.rows

    # ------------------------------------------------------------------ producer
    def _start_producer(self) -> None:
        reg: list = []

        def setup(agent):
            reg.append(self._register(agent))
            # Fixed once memory is registered; handshakes read this copy.
            self._prod_md = agent.get_agent_metadata()

        def teardown(agent):
            agent.deregister_memory(reg.pop())

        self._prod = AgentThread(self.agent_name, setup, teardown, notifs=self._count_notifs,
                                  busy=lambda: any(s.granted for s in list(self._serving.values())))

    def _count_notifs(self, notifs: dict) -> None:
        for remote, msgs in notifs.items():
            self._notifs += len(msgs)
            if logger.isEnabledFor(logging.DEBUG):
                for msg in msgs:
                    rid, _, xfer = msg.decode(errors="replace").rpartition(":")
                    logger.debug("kvbridge: %s finished reading request %s (transfer %s)",
                                 agent_label(remote), rid, xfer)

    def _server_info(self) -> dict:
        return {"agent": self.agent_name, "metadata": self._prod_md,
                "mem_type": self._mem_type, "dev_id": self._dev_id,
                **region_info(self.cache)}

    def _send_pull(self, conn, grant: P.PullGrant, ids: list[int], state: ServerConn,
                   block_slice=None) -> None:
        self._serving[id(state)] = state
        send_grant(self, conn, grant)
        # Then poll (and progress) fast until the read is done. After the
        # grant, not before: woken first, the agent thread took the GIL while
        # the grant was being sent, and the grant waited for it.
        if self._prod is not None:
            self._prod.wake()

    def _server_conn_closed(self, state: ServerConn) -> None:
        self._serving.pop(id(state), None)

    # ------------------------------------------------------------------ consumer
    def _client_info(self) -> dict:
        return {"agent": self._cons_name}

    def _consumer(self) -> AgentThread:
        """The consumer agent, its cache registered and described (started lazily)."""
        with self._cons_lock:
            if self._closing.is_set():
                raise RuntimeError("transport closed")
            if self._cons is None:
                state = self._local_state
                regions = [(a, s) for a, s, _ in self.cache.region_addresses()]

                def setup(agent):
                    state["reg"] = self._register(agent)
                    state["local"] = agent.prep_xfer_dlist(
                        "NIXL_INIT_AGENT",
                        block_descs(regions, self.cache.num_blocks, self._dev_id,
                                    self.layout.block_bytes),
                        self._mem_type)

                def teardown(agent):
                    for data in list(self._peer_data):
                        self._release_peer_locked(agent, data)
                    for key in [k for k in state if k == "local" or isinstance(k, tuple)]:
                        state.pop(key).release()
                    agent.deregister_memory(state.pop("reg"))

                self._cons = AgentThread(self._cons_name, setup, teardown)
            return self._cons

    def _connect_data(self, conn: PeerConnection) -> PeerData:
        info = conn.remote_info
        regions, num_blocks = parse_regions(info)
        if len(regions) != self.layout.num_regions:
            raise ValueError(f"producer has {len(regions)} regions, layout says "
                             f"{self.layout.num_regions}")
        # The producer's blocks may be larger or smaller than ours (another TP size).
        descs = block_descs(regions, num_blocks, int(info["dev_id"]),
                            conn.remote_layout.block_bytes)
        mem_type = str(info["mem_type"])

        def connect(agent):
            key = agent_key(info["agent"])
            if key not in self._remotes:
                key = agent_key(agent.add_remote_agent(bytes(info["metadata"])))
            self._remotes[key] = self._remotes.get(key, 0) + 1
            try:
                dlist = agent.prep_xfer_dlist(key, descs, mem_type)
            except Exception:
                self._drop_remote(agent, key)
                raise
            try:
                agent.make_connection(key)  # connect now, not in the first READ
            except Exception as e:  # noqa: BLE001 - the first READ connects anyway
                logger.debug("kvbridge: NIXL make_connection to %s: %s", agent_label(key), e)
            data = PeerData(key, num_blocks, dlist, regions, conn.remote_layout.block_bytes,
                             int(info["dev_id"]), mem_type)
            self._peer_data.add(data)
            return data

        return self._consumer().call(connect)

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        data: PeerData = conn.data
        if not check_grant(handle, grant, data.num_blocks):
            return False
        with data.lock:
            if data.closed:
                handle._set_error("connection to the producer closed", ErrorCode.PEER_GONE)
                return False
            data.busy = True
        try:
            return self._read(conn, data, handle, handle.remote_ids,
                              self._verifies(grant) and checksum.NATIVE is not None
                              and handle.local_slice is None)
        finally:
            with data.lock:
                data.busy = False
                release = data.closed
            if release:
                self._release_peer(data)

    def _read(self, conn: PeerConnection, data: PeerData, handle: TransferHandle,
              remote_ids: list[int], digest: bool) -> bool:
        """READ the pull's blocks. With ``digest`` (a verified pull of whole
        blocks of ``PIECE_MIN_BYTES`` or more) in pieces of about
        ``PIECE_BYTES``, two in flight, each digested as soon as it landed -
        while it is still in cache, and while the next piece moves - by one
        task on the shared digest pool; the digests become
        ``handle.landed_digests``. Returns
        only once no READ of this pull can still write into its blocks."""
        engine = self._cons
        if engine is None:
            handle._set_error("transport closed", ErrorCode.TRANSFER)
            return False
        try:
            local_dlist, remote_dlist, rows = self._slice_dlists(data, handle)
        except (ValueError, RuntimeError) as e:
            handle._set_error(f"cannot describe this TP slice for NIXL: {e}", ErrorCode.LAYOUT)
            return False
        n = len(handle.local_ids)
        step = n
        if digest and rows == 1 and PIECE_BYTES and handle.nbytes >= PIECE_MIN_BYTES:
            step = max(1, PIECE_BYTES // max(1, handle.nbytes // max(1, n)))
        starts = iter(range(0, n, step))
        inflight: deque[tuple[int, Read]] = deque()
        t0 = time.monotonic()
        # One task on the shared pool digests the pieces in landing order, one
        # at a time (two at once competed with the copy: ~5 % slower here).
        landed: queue.SimpleQueue = queue.SimpleQueue()
        digester = (checksum.submit(self._digest_landed, handle.local_ids, step, landed)
                    if step < n else None)

        def post(lo: int) -> None:
            local_idx, remote_idx = read_indices(
                self.layout.num_regions, rows, self.cache.num_blocks,
                handle.local_ids[lo:lo + step], data.num_blocks, remote_ids[lo:lo + step])
            # No notification: ReadDone on the control connection completes
            # the read, and a notification cost ~110 us a small READ.
            read = Read(local_dlist, local_idx, remote_dlist, remote_idx, b"")
            inflight.append((lo, read))
            engine.read(read)

        try:
            for lo in itertools.islice(starts, 2):
                post(lo)
            while inflight:
                lo, read = inflight[0]
                if not self._await_read(conn, data, handle, engine, read, t0):
                    return False
                inflight.popleft()
                landed.put(lo)
                lo = next(starts, None)
                if lo is not None:
                    post(lo)
            if digester is not None:
                landed.put(None)
                handle.landed_digests, digester = digester.result(), None
            return True
        finally:
            for _, read in inflight:  # a piece failed: end the others first
                engine.abort(read, handle.error or "an earlier piece failed")
                while not read.done.wait(LIVENESS_S) and engine.alive:
                    pass
            if digester is not None:
                landed.put(None)  # ends the digest task; its digests go unused

    def _digest_landed(self, local_ids: list[int], step: int,
                       landed: queue.SimpleQueue) -> list[int]:
        """Digests of the pieces ``landed`` names (their first index), until None."""
        out: list[int] = []
        while (lo := landed.get()) is not None:
            out += checksum.native_block_digests(self.cache, local_ids[lo:lo + step], 1)
        return out

    def _await_read(self, conn: PeerConnection, data: PeerData, handle: TransferHandle,
                    engine: AgentThread, read: Read, t0: float) -> bool:
        """See a started ``read`` end: True once DONE, else the handle's error set."""
        abort_code = ErrorCode.TRANSFER  # aborted by close(): the transport's own end
        while not read.done.wait(LIVENESS_S):
            stop = self._stop_reason(conn, time.monotonic() - t0)
            if stop is not None:
                why, abort_code = stop
                engine.abort(read, why)
                read.done.wait()
                if read.state != "DONE":
                    # UCX cannot always recall a READ's bytes in flight (over
                    # TCP they kept landing): drop the connection, which
                    # removes the remote agent and with it the endpoint.
                    _shutdown(conn.sock)
                break
            if not engine.alive and not read.done.is_set():
                read.error, read.state = "transport closed", "ABORTED"
                break
        if read.state == "DONE":
            return True
        if read.state == "ABORTED":
            handle._set_error(read.error, abort_code)
        else:
            handle._set_error(f"NIXL {BACKEND} READ from {agent_label(data.remote_agent)} failed"
                              + (f": {read.error}" if read.error else ""), ErrorCode.TRANSFER)
        return False

    def _stop_reason(self, conn: PeerConnection,
                     elapsed: float) -> tuple[str, ErrorCode] | None:
        """Why a READ in flight must be aborted now (and its code), or None."""
        if self._closing.is_set():
            return None  # close() aborts after its grace period
        if elapsed > self.config.transfer_timeout_s:
            return (f"no progress for {self.config.transfer_timeout_s:.0f} s (producer hung?)",
                    ErrorCode.TIMEOUT)
        # This reader thread is here, not in recv, so it would not notice the
        # producer going away: look at the control connection without reading.
        sock = conn.sock
        try:
            if sock is None or sock.fileno() < 0:
                return "connection to the producer closed", ErrorCode.PEER_GONE
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                return (f"producer {conn.address} closed the connection mid-transfer",
                        ErrorCode.PEER_GONE)
        except (OSError, ValueError) as e:
            return f"connection to producer {conn.address} failed: {e}", ErrorCode.PEER_GONE
        return None

    def _disconnect_data(self, conn: PeerConnection) -> None:
        data = conn.data
        if not isinstance(data, PeerData):
            return
        with data.lock:
            data.closed = True
            if data.busy:
                return  # its reader thread releases it when the READ is over
        self._release_peer(data)

    def _release_peer(self, data: PeerData) -> None:
        engine = self._cons
        if engine is None:
            return
        try:
            engine.call(self._release_peer_locked, data)
        except RuntimeError:
            pass  # stopping: its teardown releases every peer

    def _release_peer_locked(self, agent, data: PeerData) -> None:
        """On the consumer agent's thread: drop one producer connection's state."""
        if data.released:
            return
        data.released = True
        self._peer_data.discard(data)
        try:
            data.remote_dlist.release()
            for dlist in data.slice_dlists.values():
                dlist.release()
        except Exception as e:  # noqa: BLE001
            logger.warning("kvbridge: releasing NIXL descriptors of %s: %s",
                           agent_label(data.remote_agent), e)
        self._drop_remote(agent, agent_key(data.remote_agent))

    def _drop_remote(self, agent, key: bytes) -> None:
        left = self._remotes.get(key, 0) - 1
        if left > 0:
            self._remotes[key] = left
            return
        self._remotes.pop(key, None)
        try:
            agent.remove_remote_agent(key)
        except Exception as e:  # noqa: BLE001
            logger.warning("kvbridge: removing NIXL agent %s: %s", agent_label(key), e)

    # ------------------------------------------------------------------ lifecycle
    def metrics(self) -> dict:
        out = super().metrics()
        out["nixl_notifs"] = self._notifs
        return out

    def _close_backend(self) -> None:
        with self._cons_lock:
            cons, self._cons = self._cons, None
        for engine, grace in ((cons, CLOSE_GRACE_S), (self._prod, 0.0)):
            if engine is not None and not engine.stop(grace):
                logger.error("kvbridge: NIXL agent %s did not stop", engine.name)
        self._prod = None



def _shutdown(sock: socket.socket | None) -> None:
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _current_cuda_device() -> int:
    import torch

    return torch.cuda.current_device()
