# SPDX-License-Identifier: Apache-2.0
"""The processes of ``kvbridge bench chaos``: vLLM instances that can be
killed, restarted and stopped, a crash monitor, and the ``kvbridge proxy``.

An *instance* is one role on one port (``prefill0``, ``decode0``, …); each
start of it is an *incarnation* with its own log file. The benchmark's own
faults (SIGKILL, SIGSTOP) mark the incarnation as expected-down first, so the
monitor counts as an engine crash only what nobody caused: a process that
exits by itself, ``/health`` answering an error, or vLLM's engine-death lines
in the log (scanned only up to the moment the benchmark killed it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kvbridge.serve.launch import (
    VllmServer,
    free_port,
    kv_transfer_config,
    start_server,
    stop_group,
    wait_http_healthy,
)

#: Lines that mean an engine died (vLLM's EngineDeadError message, a dead
#: worker, and the scheduler assertion a failed KV load can trip today).
CRASH_MARKERS = ("EngineCore encountered an issue", "EngineDeadError", "died unexpectedly",
                 "assert req_id in self.requests")
_USAGE_RE = re.compile(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.e+-]+)$", re.M)
_SOURCE_RE = re.compile(r'^vllm:prompt_tokens_by_source_total\{[^}]*source="(\w+)"[^}]*\} '
                        r"([0-9.e+-]+)$", re.M)
_BLOCKS_RE = re.compile(r'^vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', re.M)


def scrape(url: str, timeout: float = 5.0) -> dict | None:
    """KV cache usage, prompt tokens by source and block count from /metrics."""
    try:
        text = httpx.get(url + "/metrics", timeout=timeout).text
    except httpx.HTTPError:
        return None
    out: dict = {"sources": {}}
    m = _USAGE_RE.search(text)
    out["kv_usage"] = float(m.group(1)) if m else None
    for src, v in _SOURCE_RE.findall(text):
        out["sources"][src] = out["sources"].get(src, 0) + int(float(v))
    m = _BLOCKS_RE.search(text)
    out["num_blocks"] = int(m.group(1)) if m else None
    return out


@dataclass
class Incarnation:
    label: str
    server: VllmServer
    extra: dict
    t_start: float
    t_ready: float | None = None
    #: "starting" | "up" | "stopped" (SIGSTOP) | "killed" (by us) | "crashed" | "ended"
    #: | "failed_start"
    state: str = "starting"
    #: log bytes that belong to the engine's own life (set when we kill/stop it)
    log_limit: int | None = None
    log_scanned: int = 0
    health_misses: int = 0
    metrics_first: dict | None = None
    metrics_last: dict | None = None
    crash: dict | None = None


@dataclass
class Instance:
    name: str
    kv_role: str
    port: int
    core: int
    block_size: int = 128
    #: kv_load_failure_policy (None: the stack's)
    policy: str | None = None
    #: replace a crashed engine (off for an instance the run does not need)
    restart_on_crash: bool = True
    incarnations: list[Incarnation] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def current(self) -> Incarnation | None:
        return self.incarnations[-1] if self.incarnations else None


class Stack:
    """Every process the chaos run starts; ``stop()`` ends all of them by pid."""

    def __init__(self, model: str, log_dir: Path, *, transport: str, policy: str,
                 extra: dict, clock):
        self.model, self.log_dir, self.transport, self.policy = model, log_dir, transport, policy
        self.extra = extra
        self.clock = clock  # seconds since the run started
        self.instances: dict[str, Instance] = {}
        self.others: list[VllmServer] = []  # the colocated reference
        self.proxy: subprocess.Popen | None = None
        self.proxy_url: str | None = None
        self.crashes: list[dict] = []
        self.events: list[str] = []
        self._lock = threading.RLock()
        self._stop_monitor = threading.Event()
        self._monitor: threading.Thread | None = None
        self.auto_restart = True
        #: called around the restart of a crashed engine (the load slows down)
        self.on_restart_begin = self.on_restart_end = lambda: None

    # ------------------------------------------------------------------ instances
    def add(self, name: str, kv_role: str, core: int, block_size: int = 128,
            policy: str | None = None) -> Instance:
        inst = Instance(name, kv_role, free_port(), core, block_size, policy)
        self.instances[name] = inst
        return inst

    def start(self, inst: Instance, extra: dict | None = None) -> Incarnation:
        """Start a new incarnation of ``inst`` on its port (returns at once)."""
        n = len(inst.incarnations) + 1
        label = f"{inst.name}#{n}"
        ext = {**self.extra, **(extra or {})}
        kv = kv_transfer_config(inst.kv_role, transport=self.transport,
                                policy=inst.policy or self.policy,
                                kv_port=free_port(), extra=ext)
        server = start_server(f"{inst.name}-{n}", self.model, inst.port, kv_config=kv,
                              block_size=inst.block_size, cpu_core=inst.core,
                              log_dir=self.log_dir, served_name="tiny")
        inc = Incarnation(label, server, ext, self.clock())
        with self._lock:
            inst.incarnations.append(inc)
        return inc

    def wait_up(self, inst: Instance, timeout_s: float = 300.0) -> Incarnation:
        """Wait until the current incarnation answers /health; raises if it dies."""
        inc = inst.current
        deadline = time.monotonic() + timeout_s
        while True:
            if not inc.server.alive():
                inc.state = "failed_start"  # reported by the caller, not as a crash
                raise RuntimeError(f"{inc.label} exited with {inc.server.proc.returncode} "
                                   f"during start-up; last log lines ({inc.server.log_path}):\n"
                                   f"{inc.server.log_tail()}")
            if inc.server.healthy():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{inc.label} not healthy after {timeout_s:.0f} s")
            time.sleep(0.5)
        inc.t_ready = self.clock()
        inc.metrics_first = inc.metrics_last = scrape(inst.url)
        with self._lock:
            inc.state = "up"
        return inc

    def kill(self, inst: Instance) -> None:
        """SIGKILL the current incarnation's process group (a fault we cause)."""
        inc = inst.current
        with self._lock:
            if inc.state == "up":
                inc.metrics_last = scrape(inst.url, timeout=2.0) or inc.metrics_last
            inc.state = "killed"
            inc.log_limit = _size(inc.server.log_path)
        inc.server.kill()

    def sigstop(self, inst: Instance) -> None:
        inc = inst.current
        with self._lock:
            inc.state = "stopped"
        os.killpg(inc.server.proc.pid, signal.SIGSTOP)

    def sigcont(self, inst: Instance) -> None:
        inc = inst.current
        os.killpg(inc.server.proc.pid, signal.SIGCONT)
        with self._lock:
            inc.health_misses = 0
            inc.state = "up"

    def incarnations(self) -> list[tuple[Instance, Incarnation]]:
        return [(i, inc) for i in self.instances.values() for inc in i.incarnations]

    # ------------------------------------------------------------------ monitor
    def start_monitor(self, interval_s: float = 1.0) -> None:
        self._monitor = threading.Thread(target=self._monitor_loop, args=(interval_s,),
                                         name="chaos-monitor", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._stop_monitor.set()
        if self._monitor is not None:
            self._monitor.join(30)

    def _monitor_loop(self, interval_s: float) -> None:
        tick = 0
        while not self._stop_monitor.wait(interval_s):
            tick += 1
            for inst in list(self.instances.values()):
                try:
                    self.check(inst, scrape_metrics=tick % 2 == 0)
                except Exception as e:  # noqa: BLE001 - the monitor must not die
                    self.events.append(f"[{self.clock():6.1f} s] monitor error on {inst.name}: "
                                       f"{e!r}")

    def check(self, inst: Instance, scrape_metrics: bool = False) -> None:
        """One monitor round for ``inst``: process, /health, log markers."""
        inc = inst.current
        if inc is None:
            return
        with self._lock:
            state = inc.state
        self.scan_log(inc)
        if state != "up" or inc.crash is not None:
            return
        reason = None
        if not inc.server.alive():
            reason = f"process exited by itself with code {inc.server.proc.returncode}"
        elif inc.crash is None:
            try:
                r = httpx.get(inst.url + "/health", timeout=3.0)
                inc.health_misses = 0
                if r.status_code != 200:
                    reason = f"/health answered {r.status_code}"
            except httpx.HTTPError as e:
                inc.health_misses += 1
                if inc.health_misses >= 5:
                    reason = f"/health not answering for 5 rounds ({type(e).__name__})"
        if reason is None and inc.crash is None and scrape_metrics:
            m = scrape(inst.url, timeout=3.0)
            if m is not None:
                inc.metrics_last = m
        if reason is not None:
            self.crashed(inst, inc, reason)

    def scan_log(self, inc: Incarnation) -> None:
        """Look for engine-death lines in the part of the log the engine wrote
        by itself (up to where we killed or stopped it)."""
        if inc.state in ("starting", "failed_start"):
            return  # a start-up failure is raised by wait_up, not counted here
        path = inc.server.log_path
        end = inc.log_limit if inc.log_limit is not None else _size(path)
        if end <= inc.log_scanned:
            return
        with open(path, "rb") as f:
            f.seek(max(0, inc.log_scanned - 200))  # a marker split across reads
            chunk = f.read(end - max(0, inc.log_scanned - 200)).decode(errors="replace")
        inc.log_scanned = end
        if inc.crash is not None:
            return
        for marker in CRASH_MARKERS:
            pos = chunk.find(marker)
            if pos >= 0:
                inst = next(i for i in self.instances.values() if inc in i.incarnations)
                self.crashed(inst, inc, f"log: {_detail(chunk, pos)}")
                return

    def explain_crashes(self) -> None:
        """A crash seen through /health or the process exit gets the engine's own
        last words from its log too (written a moment after /health turned)."""
        for _, inc in self.incarnations():
            if inc.crash is None or inc.crash["reason"].startswith("log:"):
                continue
            try:
                text = inc.server.log_path.read_bytes()[:inc.log_limit].decode(
                    errors="replace")
            except OSError:
                continue
            for marker in CRASH_MARKERS:
                pos = text.find(marker)
                if pos >= 0:
                    inc.crash["reason"] += f" | log: {_detail(text, pos)}"
                    break

    def crashed(self, inst: Instance, inc: Incarnation, reason: str) -> None:
        with self._lock:
            if inc.crash is not None:
                return
            inc.crash = {"instance": inst.name, "incarnation": inc.label,
                         "t_s": round(self.clock(), 1), "reason": reason,
                         "log": str(inc.server.log_path)}
            self.crashes.append(inc.crash)
            was_current = inc is inst.current and inc.state in ("up", "starting")
            if was_current:
                inc.state = "crashed"
        self.events.append(f"[{self.clock():6.1f} s] ENGINE CRASH {inc.label}: {reason}")
        if was_current and self.auto_restart and inst.restart_on_crash:
            threading.Thread(target=self._restart_crashed, args=(inst, inc), daemon=True,
                             name=f"restart-{inst.name}").start()

    def _restart_crashed(self, inst: Instance, inc: Incarnation) -> None:
        """A crashed engine is replaced so the run goes on (and counted once)."""
        self.on_restart_begin()
        try:
            inc.log_limit = _size(inc.server.log_path)
            inc.server.kill()
            new = self.start(inst, extra={k: v for k, v in inc.extra.items()
                                          if k not in self.extra})
            self.events.append(f"[{self.clock():6.1f} s] restarting crashed {inc.label} as "
                               f"{new.label}")
            self.wait_up(inst)
            self.events.append(f"[{self.clock():6.1f} s] {new.label} up")
        except Exception as e:  # noqa: BLE001
            self.events.append(f"[{self.clock():6.1f} s] restart of {inst.name} failed: "
                               f"{str(e)[:300]}")
        finally:
            self.on_restart_end()

    # ------------------------------------------------------------------ proxy
    def start_proxy(self, prefill: list[str], decode: list[str]) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "kvbridge.cli", "proxy", "--port", str(port),
               "--health-interval", "0.5"]
        for u in prefill:
            cmd += ["--prefill", u]
        for u in decode:
            cmd += ["--decode", u]
        log = open(self.log_dir / "proxy.log", "wb")
        self.proxy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, stdin=subprocess.DEVNULL)
        log.close()
        url = f"http://127.0.0.1:{port}"
        wait_http_healthy(self.proxy, url, 60, self.log_dir / "proxy.log")
        self.proxy_url = url
        return url

    def proxy_backends(self) -> dict[str, dict]:
        """The proxy's view: url -> {healthy, quarantine, …} (empty if unreachable)."""
        try:
            r = httpx.get(self.proxy_url + "/health", timeout=3)
            return {b["url"]: b for b in r.json().get("backends", [])}
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_proxy_sees(self, url: str, pred, timeout_s: float) -> float | None:
        """Seconds until the proxy's view of ``url`` satisfies ``pred`` (None: never)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            b = self.proxy_backends().get(url)
            if b is not None and pred(b):
                return time.monotonic() - t0
            time.sleep(0.1)
        return None

    # ------------------------------------------------------------------ teardown
    def stop(self) -> list[str]:
        """Stop everything by pid; returns what could not be stopped."""
        self.stop_monitor()
        stop_group(self.proxy)
        servers = [inc.server for _, inc in self.incarnations()] + self.others
        for s in servers:  # a stopped group would sit on SIGTERM until the grace ends
            if s.alive():
                try:
                    os.killpg(s.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        for _, inc in self.incarnations():
            if inc.state not in ("killed", "crashed"):
                inc.state = "ended"
                inc.log_limit = _size(inc.server.log_path)
        for s in servers:
            if s.alive():
                try:
                    os.killpg(s.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for s in servers:
            s.stop(grace_s=10)
        left = [s.name for s in servers if s.alive()]
        if self.proxy is not None and self.proxy.poll() is None:
            left.append("proxy")
        return left


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _detail(chunk: str, pos: int) -> str:
    """The marker's line, plus the first assertion line around it (the cause)."""
    start = chunk.rfind("\n", 0, pos) + 1
    end = chunk.find("\n", pos)
    line = chunk[start:end if end >= 0 else len(chunk)].strip()
    window = chunk[max(0, pos - 6000):pos + 6000]
    cause = next((c.strip() for c in window.splitlines()
                  if "AssertionError" in c or "assert " in c), None)
    if cause and cause != line:
        return f"{line[-160:]} | {cause[-160:]}"
    return line[-240:]
