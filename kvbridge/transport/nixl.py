# SPDX-License-Identifier: Apache-2.0
"""NIXL transport: the consumer READs the producer's blocks through NIXL agents.

Each side runs a NIXL agent (UCX backend by default) with its cache regions
registered. The producer's agent metadata and region addresses travel in the
handshake (``_server_info``); the consumer loads them once per producer and
prepares descriptor lists once - one over every (region, block) of its own
cache, shared by all producers, and one over every (region, block) of each
producer's - so a pull is only ``make_prepped_xfer`` with two index lists,
``transfer`` and polling. UCX picks the medium: RDMA or TCP across hosts,
cross-memory attach (``cma``) or shared memory on one host, device memory
(``VRAM``) where UCX was built with CUDA. The control connection still
authenticates, checks layouts and grants every read, so the producer's lease
rules hold exactly as for the other backends; the consumer's ``ReadDone``
releases the lease. Each READ also carries a NIXL notification
``"<request_id>:<xfer_id>"``, NIXL's own completion signal, which the
producer only counts (``metrics()["nixl_notifs"]``) - so nothing is released
twice.

Every NIXL call on an agent runs on that agent's own thread: agents in NIXL's
default sync mode are single-threaded, and a UCX worker created on one thread
and progressed on another was measured to crash (segfault in ucp progress, in
the producer, after a consumer abandoned a READ over UCX's TCP transport).

A pull cancelled mid-flight completes (as with the other backends): NIXL can
abort a READ, but UCX may still land bytes in the local blocks afterwards (seen
over TCP), so an abort is kept for a stalled transfer, a vanished producer and
``close()`` - which waits up to ``CLOSE_GRACE_S`` for READs in flight first.
The agent is destroyed before ``close()`` returns, so no byte lands after.

Tunables (environment, read at import) [defaults]:

* ``KVBRIDGE_NIXL_BACKEND``: NIXL backend plugin ["UCX"].
* ``KVBRIDGE_NIXL_UCX_ERROR_MODE``: UCX ``ucx_error_handling_mode``, "peer" or
  "none" [auto: "none" when ``UCX_TLS`` names shared-memory transports only -
  UCX cannot create such an endpoint in "peer" mode - else "peer" (peer
  failures are reported), falling back to "none" if the backend refuses].
* ``KVBRIDGE_NIXL_PROGRESS_THREAD``: "1" runs NIXL's progress thread in both
  agents ["0"; on 2 cores it halved the throughput of a 64 MiB READ, and
  polling ``check_xfer_state`` progresses the consumer anyway].
* ``KVBRIDGE_NIXL_NOTIF_POLL_S``: producer's notification poll interval while
  a granted read is outstanding; each poll also progresses its UCX worker,
  which transports that need the target's help (TCP) rely on [0.001]. With no
  read outstanding it polls every ``IDLE_POLL_S`` (50 ms).

UCX itself reads ``UCX_TLS``, ``UCX_NET_DEVICES`` (set it - e.g. ``lo`` on one
host - or UCX may bind every interface) and friends. Like vLLM's
NixlConnector, this module sets ``UCX_MEM_MMAP_HOOK_MODE=none`` (unless set)
before importing nixl: UCX's mmap hooks leak memory under PyTorch.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from kvbridge import protocol as P
from kvbridge.cache.blocks import run_starts
from kvbridge.cache.shard import BlockSlice, paired_slices
from kvbridge.transport.base import PeerConnection, ServerConn, TransferHandle, Transport

# Must be set before UCX loads, i.e. before nixl is imported.
os.environ.setdefault("UCX_MEM_MMAP_HOOK_MODE", "none")

try:
    # nixl's logging setup turns logging.raiseExceptions off for the whole
    # process and logs INFO lines to stdout: undo the first, quiet the second.
    _raise_exceptions = logging.raiseExceptions
    from nixl._api import nixl_agent, nixl_agent_config
    logging.raiseExceptions = _raise_exceptions
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
    _IMPORT_ERROR: Exception | None = None
except (ImportError, OSError, RuntimeError) as _e:  # no nixl, or no usable build of it
    nixl_agent = nixl_agent_config = None  # type: ignore[assignment,misc]
    _IMPORT_ERROR = _e

logger = logging.getLogger("kvbridge.transport")

BACKEND = os.environ.get("KVBRIDGE_NIXL_BACKEND", "UCX")
UCX_ERROR_MODE = os.environ.get("KVBRIDGE_NIXL_UCX_ERROR_MODE", "")
PROGRESS_THREAD = os.environ.get("KVBRIDGE_NIXL_PROGRESS_THREAD", "0") == "1"
NOTIF_POLL_S = float(os.environ.get("KVBRIDGE_NIXL_NOTIF_POLL_S", "0.001"))
#: Producer's poll interval with no read outstanding: notifications are then
#: only late stats, and a 1 ms wakeup would cost an idle server CPU.
IDLE_POLL_S = 0.05
#: Spin on check_xfer_state this long before yielding between polls. Over CMA
#: a READ completes inside transfer() itself; a remote one runs long enough
#: that a yield per round of polls costs nothing.
SPIN_S = 0.002
#: How often a pull in flight checks its control connection and deadline.
LIVENESS_S = 0.05
#: How long close() lets READs in flight finish before aborting them.
CLOSE_GRACE_S = 1.0
#: UCX transports that can report a peer failure ("peer" error mode).
_PEER_FAILURE_TLS = ("tcp", "rc", "ud", "dc", "ib", "all")


def _ucx_error_modes() -> list[str]:
    """UCX error handling modes to try, in order ("" = UCX backend default, "peer")."""
    if UCX_ERROR_MODE:
        return [UCX_ERROR_MODE]
    tls = os.environ.get("UCX_TLS", "").strip()
    if tls and not tls.startswith("^"):
        names = [t.strip().lower() for t in tls.split(",") if t.strip()]
        if names and not any(n.startswith(_PEER_FAILURE_TLS) for n in names):
            return ["none"]
    return ["", "none"]


def _new_agent(name: str):
    conf = nixl_agent_config(enable_prog_thread=PROGRESS_THREAD, enable_listen_thread=False,
                             backends=[])
    agent = nixl_agent(name, conf)
    if BACKEND != "UCX":
        agent.create_backend(BACKEND, {})
        return agent
    modes = _ucx_error_modes()
    for i, mode in enumerate(modes):
        try:
            agent.create_backend(BACKEND, {"ucx_error_handling_mode": mode} if mode else {})
            return agent
        except Exception as e:  # noqa: BLE001 - nixlBackendError: try the next mode
            if i == len(modes) - 1:
                raise RuntimeError(f"NIXL could not create its {BACKEND} backend "
                                   f"(UCX_TLS={os.environ.get('UCX_TLS')!r}): {e}") from e
            logger.info("kvbridge: NIXL %s backend refused error mode %r (%s); trying %r",
                        BACKEND, mode or "peer", e, modes[i + 1])
    raise AssertionError("unreachable")


def _name(agent_name) -> str:
    return agent_name.decode() if isinstance(agent_name, bytes) else str(agent_name)


class _Read:
    """A READ run by an agent thread; ``done`` is set once it is over."""

    __slots__ = ("args", "state", "error", "abort", "xfer", "done")

    def __init__(self, *args) -> None:
        self.args = args
        self.state = "PROC"  # -> DONE | ERR | ABORTED
        self.error: str | None = None
        self.abort: str | None = None  # why to abort, set by another thread
        self.xfer = None
        self.done = threading.Event()


class _AgentThread:
    """One NIXL agent and the one thread that makes every call on it.

    ``setup(agent)`` and ``teardown(agent)`` run on that thread first and last;
    other threads hand it work with ``call`` (blocking) and ``read``. With
    ``notifs`` set it also polls notifications - every ``NOTIF_POLL_S`` while
    ``busy()``, else every ``IDLE_POLL_S`` - and hands them to ``notifs``.
    """

    def __init__(self, name: str, setup: Callable[[Any], None],
                 teardown: Callable[[Any], None],
                 notifs: Callable[[dict], None] | None = None,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self._setup, self._teardown = setup, teardown
        self._notifs, self._busy = notifs, busy
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._reads: list[_Read] = []
        self._unreleased: list = []  # aborted transfers NIXL would not release yet
        self._leaked = None
        self._wake = threading.Event()
        self._poll_now = False
        self._stop_at: float | None = None
        self._ready: Future = Future()
        self.agent = None
        self._thread = threading.Thread(target=self._run, name=f"kvb-nixl-{name}", daemon=True)
        self._thread.start()
        self._ready.result()  # creation errors surface here

    # -- other threads --
    def call(self, fn: Callable, *args):
        """Run ``fn(agent, *args)`` on the agent thread; return its result."""
        fut: Future = Future()
        if not self._thread.is_alive() or self._stop_at is not None:
            raise RuntimeError(f"NIXL agent {self.name} is stopped")
        self._calls.append((fn, args, fut))
        self._wake.set()
        return fut.result()

    def read(self, read: _Read) -> None:
        """Start ``read`` (``make_prepped_xfer`` arguments); returns at once."""
        if not self._thread.is_alive():
            self._finish(read, "ABORTED", "transport closed")
            return
        self._calls.append((self._start_read, (read,), Future()))
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abort(self, read: _Read, why: str) -> None:
        read.abort = why
        self._wake.set()

    def wake(self) -> None:
        """Poll now and re-read ``busy()`` (a read was just granted)."""
        self._poll_now = True
        self._wake.set()

    def stop(self, grace_s: float = 0.0, timeout: float = 10.0) -> bool:
        """Finish READs in flight (up to ``grace_s``, then abort them), tear
        down and exit; False if the thread did not end within ``timeout``."""
        if self._stop_at is None:
            self._stop_at = time.monotonic() + grace_s
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the agent thread --
    def _run(self) -> None:
        try:
            self.agent = _new_agent(self.name)
            self._setup(self.agent)
        except BaseException as e:  # noqa: BLE001 - handed to the creating thread
            self.agent = None
            self._ready.set_exception(e)
            return
        self._ready.set_result(None)
        next_notif = 0.0
        spin_since: float | None = None
        try:
            while True:
                self._wake.clear()
                while self._calls:
                    fn, args, fut = self._calls.popleft()
                    try:
                        fut.set_result(fn(self.agent, *args))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                now = time.monotonic()
                if self._stop_at is not None and now >= self._stop_at:
                    for r in self._reads:
                        r.abort = r.abort or "transport closed"
                if self._reads or self._unreleased:
                    self._poll_reads()
                # wake() must cut an idle wait short: a READ just granted may
                # need this side's progress (UCX rendezvous over TCP), and
                # waiting out IDLE_POLL_S stalled 4-256 MiB reads by ~50 ms.
                if self._notifs is not None and (now >= next_notif or self._poll_now):
                    self._poll_now = False
                    self._poll_notifs()
                    busy = bool(self._reads) or self._busy()
                    next_notif = now + (NOTIF_POLL_S if busy else IDLE_POLL_S)
                if self._stop_at is not None and not self._reads and not self._calls:
                    return
                if self._reads:
                    # Spin, then yield the GIL between rounds of polls.
                    spin_since = spin_since or now
                    if now - spin_since > SPIN_S:
                        time.sleep(0)
                    continue
                spin_since = None
                timeout = None
                if self._notifs is not None:
                    timeout = max(0.0, next_notif - time.monotonic())
                if self._stop_at is not None:
                    timeout = 0.01 if timeout is None else min(timeout, 0.01)
                self._wake.wait(timeout)
        finally:
            self._shutdown()

    def _start_read(self, agent, read: _Read) -> None:
        try:
            read.xfer = agent.make_prepped_xfer("READ", *read.args)
            state = agent.transfer(read.xfer)
        except Exception as e:  # noqa: BLE001 - e.g. NIXL_ERR_REMOTE_DISCONNECT
            self._finish(read, "ERR", str(e))
            return
        if state == "PROC":
            self._reads.append(read)
        else:
            self._finish(read, state)

    def _poll_reads(self) -> None:
        agent = self.agent
        for read in list(self._reads):
            if read.abort is not None:
                self._reads.remove(read)
                self._finish(read, "ABORTED", read.abort)
                continue
            try:
                state = agent.check_xfer_state(read.xfer)
            except Exception as e:  # noqa: BLE001
                state, read.error = "ERR", str(e)
            if state != "PROC":
                self._reads.remove(read)
                self._finish(read, state, read.error)
        for xfer in list(self._unreleased):
            try:
                agent.check_xfer_state(xfer)
                xfer.release()
                self._unreleased.remove(xfer)
            except Exception:  # noqa: BLE001 - still busy; retry next round
                pass

    def _finish(self, read: _Read, state: str, error: str | None = None) -> None:
        read.state, read.error = state, error
        if read.xfer is not None:
            try:
                # Releases, or for a READ still active cancels, the request.
                read.xfer.release()
            except Exception as e:  # noqa: BLE001 - NIXL could not cancel it yet
                logger.debug("kvbridge: NIXL could not release %r yet: %s", read.xfer, e)
                self._unreleased.append(read.xfer)
            read.xfer = None
        read.done.set()

    def _poll_notifs(self) -> None:
        try:
            notifs = self.agent.get_new_notifs()
        except Exception as e:  # noqa: BLE001 - the control channel still rules
            logger.warning("kvbridge: reading NIXL notifications failed: %s", e)
            return
        if notifs:
            self._notifs(notifs)

    def _shutdown(self) -> None:
        for read in self._reads:
            self._finish(read, "ABORTED", read.abort or "transport closed")
        self._reads.clear()
        deadline = time.monotonic() + 2.0
        while self._unreleased and time.monotonic() < deadline:
            self._poll_reads()
            time.sleep(0.001)
        if self._unreleased:
            # Memory NIXL may still write must stay registered: keep the agent.
            logger.error("kvbridge: %d NIXL transfers would not release; leaving agent %s "
                         "(and its registered memory) in place", len(self._unreleased), self.name)
            self._leaked = self.agent
        else:
            try:
                self._teardown(self.agent)
            except Exception as e:  # noqa: BLE001
                logger.warning("kvbridge: tearing down NIXL agent %s: %s", self.name, e)
        self.agent = None  # the last reference: nixl destroys the agent here
        self._stop_at = self._stop_at or time.monotonic()
        while self._calls:  # came in while stopping: refuse
            fn, args, fut = self._calls.popleft()
            if fn == self._start_read:
                self._finish(args[0], "ABORTED", "transport closed")
            fut.set_exception(RuntimeError(f"NIXL agent {self.name} is stopped"))


class _PeerData:
    """Consumer-side NIXL state of one producer connection."""

    def __init__(self, remote_agent, num_blocks: int, remote_dlist, regions, block_bytes: int,
                 dev_id: int, mem_type: str) -> None:
        self.remote_agent = remote_agent
        self.num_blocks = num_blocks
        self.remote_dlist = remote_dlist
        #: for slice descriptor lists made later: (base, stride) per region
        self.regions = regions
        self.block_bytes = block_bytes
        self.dev_id = dev_id
        self.mem_type = mem_type
        #: (offset, length, rows) -> prepared remote dlist of that slice's runs
        self.slice_dlists: dict[tuple[int, int, int], Any] = {}
        self.lock = threading.Lock()
        self.busy = False  # a READ is in flight: its reader thread releases us
        self.closed = False
        self.released = False


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
        self._prod: _AgentThread | None = None
        self._prod_md: bytes = b""
        self._notifs = 0
        #: consumer connections this producer granted reads to; their
        #: ``granted`` dicts say whether one is outstanding (poll fast then)
        self._serving: dict[int, ServerConn] = {}  # id() -> conn (unhashable)
        # consumer
        self._cons_name = f"{self.agent_name}-pull"
        self._cons: _AgentThread | None = None
        self._cons_lock = threading.Lock()
        #: remote agent name -> peer connections using it (a producer may be
        #: reached at two addresses, or reconnected before the old one is gone)
        self._remotes: dict[bytes, int] = {}
        self._peer_data: set[_PeerData] = set()
        #: the consumer's registration and local descriptor list
        self._local_state: dict = {}

    # ------------------------------------------------------------------ memory
    def _register(self, agent):
        """Register every region of the cache (one descriptor each)."""
        return agent.register_memory([(addr, total, self._dev_id, "") for addr, _, total in
                                      self.cache.region_addresses()], self._mem_type)

    def _block_descs(self, regions: list[tuple[int, int]], num_blocks: int,
                     dev_id: int, block_bytes: int | None = None,
                     sl: BlockSlice | None = None) -> np.ndarray:
        """(addr, len, dev) rows; row ``(region * num_blocks + block) * rows +
        run`` is that run of that block (``sl``: a TP slice of ``rows`` runs;
        default the whole block, one run)."""
        block_bytes = block_bytes or self.layout.block_bytes
        starts = run_starts(regions, block_bytes, range(num_blocks), sl)
        out = np.empty((len(starts), 3), dtype=np.uint64)
        out[:, 0] = starts
        out[:, 1] = sl.length if sl is not None else block_bytes
        out[:, 2] = dev_id
        return out

    def _slice_dlists(self, data: _PeerData, handle: TransferHandle):
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
                        "NIXL_INIT_AGENT", self._block_descs(regions, self.cache.num_blocks,
                                                             self._dev_id, None, local_sl),
                        self._mem_type)
                if remote_key not in data.slice_dlists:
                    data.slice_dlists[remote_key] = agent.prep_xfer_dlist(
                        _key(data.remote_agent),
                        self._block_descs(data.regions, data.num_blocks, data.dev_id,
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

        self._prod = _AgentThread(self.agent_name, setup, teardown, notifs=self._count_notifs,
                                  busy=lambda: any(s.granted for s in list(self._serving.values())))

    def _count_notifs(self, notifs: dict) -> None:
        for remote, msgs in notifs.items():
            self._notifs += len(msgs)
            if logger.isEnabledFor(logging.DEBUG):
                for msg in msgs:
                    rid, _, xfer = msg.decode(errors="replace").rpartition(":")
                    logger.debug("kvbridge: %s finished reading request %s (transfer %s)",
                                 _name(remote), rid, xfer)

    def _server_info(self) -> dict:
        return {"agent": self.agent_name, "metadata": self._prod_md,
                "mem_type": self._mem_type, "dev_id": self._dev_id,
                "regions": [[addr, stride] for addr, stride, _ in self.cache.region_addresses()],
                "num_blocks": self.cache.num_blocks}

    def _send_pull(self, conn, grant: P.PullGrant, ids: list[int], state: ServerConn,
                   block_slice=None) -> None:
        self._serving[id(state)] = state
        if self._prod is not None:
            self._prod.wake()  # poll (and progress) fast until the read is done
        P.send_message(conn, grant)
        self.stats.bytes_served += grant.nbytes

    def _server_conn_closed(self, state: ServerConn) -> None:
        self._serving.pop(id(state), None)

    # ------------------------------------------------------------------ consumer
    def _client_info(self) -> dict:
        return {"agent": self._cons_name}

    def _consumer(self) -> _AgentThread:
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
                        self._block_descs(regions, self.cache.num_blocks, self._dev_id),
                        self._mem_type)

                def teardown(agent):
                    for data in list(self._peer_data):
                        self._release_peer_locked(agent, data)
                    for key in [k for k in state if k == "local" or isinstance(k, tuple)]:
                        state.pop(key).release()
                    agent.deregister_memory(state.pop("reg"))

                self._cons = _AgentThread(self._cons_name, setup, teardown)
            return self._cons

    def _connect_data(self, conn: PeerConnection) -> _PeerData:
        info = conn.remote_info
        num_blocks = int(info["num_blocks"])
        regions = [(int(a), int(s)) for a, s in info["regions"]]
        if len(regions) != self.layout.num_regions:
            raise ValueError(f"producer has {len(regions)} regions, layout says "
                             f"{self.layout.num_regions}")
        # The producer's blocks may be larger or smaller than ours (another TP size).
        descs = self._block_descs(regions, num_blocks, int(info["dev_id"]),
                                  conn.remote_layout.block_bytes)
        mem_type = str(info["mem_type"])

        def connect(agent):
            key = _key(info["agent"])
            if key not in self._remotes:
                key = _key(agent.add_remote_agent(bytes(info["metadata"])))
            self._remotes[key] = self._remotes.get(key, 0) + 1
            try:
                dlist = agent.prep_xfer_dlist(key, descs, mem_type)
            except Exception:
                self._drop_remote(agent, key)
                raise
            try:
                agent.make_connection(key)  # connect now, not in the first READ
            except Exception as e:  # noqa: BLE001 - the first READ connects anyway
                logger.debug("kvbridge: NIXL make_connection to %s: %s", _name(key), e)
            data = _PeerData(key, num_blocks, dlist, regions, conn.remote_layout.block_bytes,
                             int(info["dev_id"]), mem_type)
            self._peer_data.add(data)
            return data

        return self._consumer().call(connect)

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        if handle.cancel_requested:
            return False
        if grant.nbytes != handle.nbytes:
            raise P.ProtocolError(f"grant of {grant.nbytes} bytes for a {handle.nbytes}-byte pull")
        data: _PeerData = conn.data
        remote_ids = np.asarray(handle.remote_ids, dtype=np.int64)
        # An id past the producer's cache would address another region's block.
        if remote_ids.size and (remote_ids.min() < 0 or remote_ids.max() >= data.num_blocks):
            handle.error = "remote block id beyond the producer's cache"
            return False
        with data.lock:
            if data.closed:
                handle.error = "connection to the producer closed"
                return False
            data.busy = True
        try:
            return self._read(conn, data, handle, remote_ids)
        finally:
            with data.lock:
                data.busy = False
                release = data.closed
            if release:
                self._release_peer(data)

    def _read(self, conn: PeerConnection, data: _PeerData, handle: TransferHandle,
              remote_ids: np.ndarray) -> bool:
        engine = self._cons
        if engine is None:
            handle.error = "transport closed"
            return False
        try:
            local_dlist, remote_dlist, rows = self._slice_dlists(data, handle)
        except (ValueError, RuntimeError) as e:
            handle.error = f"cannot describe this TP slice for NIXL: {e}"
            return False
        regions = np.arange(self.layout.num_regions, dtype=np.int64)[:, None, None]
        runs = np.arange(rows, dtype=np.int64)[None, None, :]
        local_ids = np.asarray(handle.local_ids, dtype=np.int64)[None, :, None]
        # Region-major, then block, then run: the staging order of every backend.
        local_idx = ((regions * self.cache.num_blocks + local_ids) * rows + runs).ravel()
        remote_idx = ((regions * data.num_blocks + remote_ids[None, :, None]) * rows
                      + runs).ravel()
        read = _Read(local_dlist, local_idx.astype(np.int32), remote_dlist,
                     remote_idx.astype(np.int32),
                     f"{handle.request_id}:{handle.xfer_id}".encode())
        engine.read(read)
        t0 = time.monotonic()
        while not read.done.wait(LIVENESS_S):
            why = self._stop_reason(conn, time.monotonic() - t0)
            if why is not None:
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
        handle.error = (read.error if read.state == "ABORTED" else
                        f"NIXL {BACKEND} READ from {_name(data.remote_agent)} failed"
                        + (f": {read.error}" if read.error else ""))
        return False

    def _stop_reason(self, conn: PeerConnection, elapsed: float) -> str | None:
        """Why a READ in flight must be aborted now, or None."""
        if self._closing.is_set():
            return None  # close() aborts after its grace period
        if elapsed > self.config.transfer_timeout_s:
            return f"no progress for {self.config.transfer_timeout_s:.0f} s (producer hung?)"
        # This reader thread is here, not in recv, so it would not notice the
        # producer going away: look at the control connection without reading.
        sock = conn.sock
        try:
            if sock is None or sock.fileno() < 0:
                return "connection to the producer closed"
            readable, _, _ = select.select([sock], [], [], 0)
            if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                return f"producer {conn.address} closed the connection mid-transfer"
        except (OSError, ValueError) as e:
            return f"connection to producer {conn.address} failed: {e}"
        return None

    def _disconnect_data(self, conn: PeerConnection) -> None:
        data = conn.data
        if not isinstance(data, _PeerData):
            return
        with data.lock:
            data.closed = True
            if data.busy:
                return  # its reader thread releases it when the READ is over
        self._release_peer(data)

    def _release_peer(self, data: _PeerData) -> None:
        engine = self._cons
        if engine is None:
            return
        try:
            engine.call(self._release_peer_locked, data)
        except RuntimeError:
            pass  # stopping: its teardown releases every peer

    def _release_peer_locked(self, agent, data: _PeerData) -> None:
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
                           _name(data.remote_agent), e)
        self._drop_remote(agent, _key(data.remote_agent))

    def _drop_remote(self, agent, key: bytes) -> None:
        left = self._remotes.get(key, 0) - 1
        if left > 0:
            self._remotes[key] = left
            return
        self._remotes.pop(key, None)
        try:
            agent.remove_remote_agent(key)
        except Exception as e:  # noqa: BLE001
            logger.warning("kvbridge: removing NIXL agent %s: %s", _name(key), e)

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


def _key(agent_name) -> bytes:
    return agent_name if isinstance(agent_name, bytes) else str(agent_name).encode()


def _current_cuda_device() -> int:
    import torch

    return torch.cuda.current_device()
