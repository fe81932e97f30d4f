# SPDX-License-Identifier: Apache-2.0
"""The NIXL agent and its own thread (``AgentThread``), which makes the
agent's calls and polls what is in flight; UCX error-mode fallbacks when
creating it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kvbridge.transport.nixl.config import (
    BACKEND,
    GRANT_SPIN_S,
    IDLE_POLL_S,
    NOTIF_POLL_S,
    PROGRESS_THREAD,
    SPIN_S,
    UCX_ERROR_MODE,
)

try:
    # nixl's logging setup turns logging.raiseExceptions off for the whole
    # process and logs INFO lines to stdout: undo the first, quiet the second.
    _raise_exceptions = logging.raiseExceptions
    from nixl._api import nixl_agent, nixl_agent_config
    try:
        from nixl._api import nixl_thread_sync_t
        #: calls on an agent may come from two threads, one at a time
        _SYNC = {"sync_mode": nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT}
    except ImportError:  # an older nixl: no sync modes; our own lock serializes
        _SYNC = {}
    logging.raiseExceptions = _raise_exceptions
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logging.getLogger("nixl").setLevel(logging.WARNING)
    _IMPORT_ERROR: Exception | None = None
except (ImportError, OSError, RuntimeError) as _e:  # no nixl, or no usable build of it
    nixl_agent = nixl_agent_config = None  # type: ignore[assignment,misc]
    _IMPORT_ERROR = _e

logger = logging.getLogger("kvbridge.transport")

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
                             backends=[], **_SYNC)
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


class Read:
    """A READ run by an agent thread; ``done`` is set once it is over."""

    __slots__ = ("args", "state", "error", "abort", "xfer", "done")

    def __init__(self, *args) -> None:
        self.args = args
        self.state = "PROC"  # -> DONE | ERR | ABORTED
        self.error: str | None = None
        self.abort: str | None = None  # why to abort, set by another thread
        self.xfer = None
        self.done = threading.Event()


class AgentThread:
    """One NIXL agent and the thread that polls it.

    ``setup(agent)`` and ``teardown(agent)`` run on that thread first and last;
    other threads hand it work with ``call`` (blocking) and ``read``. With
    ``notifs`` set it also polls notifications - every ``NOTIF_POLL_S`` while
    ``busy()``, else every ``IDLE_POLL_S`` - and hands them to ``notifs``.

    ``read`` starts a READ on the calling thread, not this one: over shared
    memory UCX copies inside ``transfer()``, so a small READ is over before
    the call returns, and handing it to this thread and back cost two thread
    wake-ups (~100 us of a 4 KiB pull, against a 4 us READ). Every call on
    the agent, from either thread, holds ``_lock``: one call at a time, as
    when this thread made them all.
    """

    def __init__(self, name: str, setup: Callable[[Any], None],
                 teardown: Callable[[Any], None],
                 notifs: Callable[[dict], None] | None = None,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self._setup, self._teardown = setup, teardown
        self._notifs, self._busy = notifs, busy
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._reads: list[Read] = []
        self._unreleased: list = []  # aborted transfers NIXL would not release yet
        self._leaked = None
        self._wake = threading.Event()
        self._poll_now = False
        self._stop_at: float | None = None
        self._ready: Future = Future()
        #: held around every call on the agent (this thread's and ``read``'s)
        self._lock = threading.Lock()
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

    def read(self, read: Read) -> None:
        """Start ``read`` (``make_prepped_xfer`` arguments) here, on the
        calling thread; if NIXL did not finish it inside ``transfer()``, this
        agent's thread polls it to the end. Never waits for the network."""
        with self._lock:
            if self.agent is None or self._stop_at is not None:
                self._finish(read, "ABORTED", "transport closed")
                return
            self._start_read(self.agent, read)
        if not read.done.is_set():
            self._wake.set()  # polled from here on by the agent thread

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def abort(self, read: Read, why: str) -> None:
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
        granted_at: float | None = None
        try:
            while True:
                self._wake.clear()
                while self._calls:
                    fn, args, fut = self._calls.popleft()
                    try:
                        with self._lock:
                            result = fn(self.agent, *args)
                        fut.set_result(result)
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                now = time.monotonic()
                with self._lock:
                    if self._stop_at is not None and now >= self._stop_at:
                        for r in self._reads:
                            r.abort = r.abort or "transport closed"
                    if self._reads or self._unreleased:
                        self._poll_reads()
                # wake() must cut an idle wait short: a READ just granted may
                # need this side's progress (UCX rendezvous over TCP), and
                # waiting out IDLE_POLL_S stalled 4-256 MiB reads by ~50 ms.
                if self._notifs is not None and (now >= next_notif or self._poll_now):
                    if self._poll_now:
                        granted_at = now  # a read was just granted
                    self._poll_now = False
                    self._poll_notifs()
                    busy = bool(self._reads) or self._busy()
                    if not busy:
                        granted_at, next_notif = None, now + IDLE_POLL_S
                    elif granted_at is not None and now - granted_at < GRANT_SPIN_S:
                        # Progress this side without pause just after a grant:
                        # a small READ over UCX tcp completes within it,
                        # instead of waiting out NOTIF_POLL_S (was ~1.1 ms of
                        # every small nixl pull).
                        next_notif = now
                    else:
                        next_notif = now + NOTIF_POLL_S
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
                    if timeout == 0.0 and not self._calls:
                        time.sleep(0)  # yield the GIL between polls
                        continue
                if self._stop_at is not None:
                    timeout = 0.01 if timeout is None else min(timeout, 0.01)
                self._wake.wait(timeout)
        finally:
            with self._lock:
                self._shutdown()

    def _start_read(self, agent, read: Read) -> None:
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

    def _finish(self, read: Read, state: str, error: str | None = None) -> None:
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
            with self._lock:
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
