# SPDX-License-Identifier: Apache-2.0
"""The processes tests start, one helper each, so every one is stopped the
same way (and by its pid, with its process group where it has one).

* ``Producer``   - a producer transport in its own process (``transport_peer``),
                   driven over a pipe.
* ``Engine``     - a vLLM engine in its own process (``vllm_pd.py``), driven
                   over JSON lines.
* ``HttpProcess`` - any HTTP server command (``kvbridge proxy``, ``vllm-router``)
                   with its log, health-waited and stopped with
                   ``kvbridge.serve.launch`` (as the vLLM API servers are).
* ``sigstop``/``stopped`` - hold a process (SIGSTOP) until it really is
                   stopped, and always let it go again.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvbridge.bench.netns import call_in
from kvbridge.serve.launch import free_port, stop_group, wait_http_healthy

from helpers.transport_peer import consumer_main, producer_main

HELPERS = Path(__file__).parent
#: what a transport producer gets in its environment
ENV = {"UCX_NET_DEVICES": "lo"}
NUM_BLOCKS = 64


def sigstop(pid: int) -> None:
    """Stop ``pid`` and wait until it is stopped: the signal is asynchronous,
    and a producer still running on the other core served a pull sent right
    after ``kill`` (seen once under load)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


@contextlib.contextmanager
def stopped(pid: int):
    """``pid`` held with SIGSTOP for the block, SIGCONT afterwards whatever happens."""
    sigstop(pid)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class Producer:
    """Handle on a producer process."""

    target = staticmethod(producer_main)
    seed: int | None = 11

    def __init__(self, backend: str, cache_kw: dict | None = None, config_kw: dict | None = None,
                 env: dict | None = None):
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        kw = dict(num_blocks=NUM_BLOCKS, seed=self.seed)
        kw.update(cache_kw or {})
        self.proc = ctx.Process(target=self.target,
                                args=(child, backend, kw, config_kw or {}, {**ENV, **(env or {})}),
                                daemon=True)
        self.proc.start()
        if not self.pipe.poll(180):  # spawn imports torch: slow on a loaded machine
            self.kill()
            raise RuntimeError(f"{type(self).__name__.lower()} did not start")
        self.address = self.pipe.recv()

    def call(self, *cmd, timeout: float = 30):
        self.pipe.send(cmd)
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"producer did not answer {cmd[0]}")
        return self.pipe.recv()

    def publish(self, rid, ids, lease_s=None):
        err = self.call("publish", rid, list(ids), lease_s)
        assert err is None, err

    def wait_released(self, timeout: float = 10) -> list:
        """The (request_id, reason) releases polled until the first arrive."""
        deadline = time.monotonic() + timeout
        released: list = []
        while time.monotonic() < deadline and not released:
            released = self.call("poll")
            time.sleep(0.05)
        return released

    def kill(self):
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self):
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.call("stop", timeout=10)
            except (TimeoutError, OSError, EOFError, BrokenPipeError):
                pass
        self.proc.join(10)
        self.kill()


class Consumer(Producer):
    """Handle on a consumer process (see ``transport_peer.consumer_main``):
    zeroed cache; ``pull`` starts, ``wait`` returns (state, code, error, seconds)."""

    target = staticmethod(consumer_main)
    seed = None

    def pull(self, peer: str, rid: str, remote, local) -> None:
        assert self.call("pull", peer, rid, list(remote), list(local)) is None

    def state(self, rid: str) -> str:
        return self.call("state", rid)

    def wait(self, rid: str, timeout: float) -> tuple:
        return self.call("wait", rid, timeout, timeout=timeout + 30)


class Engine:
    """A vLLM engine in its own process (``helpers/vllm_pd.py``), driven over
    stdin/stdout. Started in its own session and stopped with its group."""

    def __init__(self, role: str, model, *, env: dict | None = None, wait: bool = True,
                 **opts):
        """``env``: added to the process environment; ``wait=False`` returns
        once started, so several engines start at once (on 2 cores a pair
        of engines was up in 11-13 s, one after the other in 22-24 s): the
        first ``call`` or ``ready`` then waits for this one."""
        self.log: list[str] = []
        env = {**os.environ, "UCX_NET_DEVICES": "lo", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPERS / "vllm_pd.py"), role, str(model), json.dumps(opts)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, start_new_session=True)
        self._replies: list[dict] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        self._ready: dict | None = None
        self._asked_to_exit = False
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    def wait_ready(self, timeout: float = 180) -> dict:
        """The engine's first reply (``free`` blocks...), once it is up."""
        if self._ready is None:
            self._ready = self.wait_reply(timeout)
        return self._ready

    @property
    def ready(self) -> dict:
        return self.wait_ready()

    def _pump(self):
        for line in self.proc.stdout:
            with self._cv:
                if line.startswith("@@"):
                    self._replies.append(json.loads(line[2:]))
                else:
                    self.log.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_reply(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self._replies:
                    raise RuntimeError(f"engine gave no reply (exit {self.proc.poll()}):\n"
                                       + "".join(self.log[-40:]))
                self._cv.wait(min(left, 0.5))
            return self._replies.pop(0)

    def call(self, timeout: float = 120, **cmd) -> dict:
        self.wait_ready()  # else the ready reply would be taken for this one's
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.wait_reply(timeout)

    def logs(self) -> str:
        with self._cv:
            return "".join(self.log)

    def ask_to_exit(self) -> None:
        """Ask the engine to exit, without waiting: an engine's shutdown takes
        seconds, and several engines shut down together (then ``stop`` each)."""
        if self.proc.poll() is None and not self._asked_to_exit:
            self._asked_to_exit = True
            try:
                self.proc.stdin.write('{"cmd": "exit"}\n')
                self.proc.stdin.flush()
            except OSError:
                pass

    def stop(self):
        self.ask_to_exit()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        stop_group(self.proc)  # SIGTERM, then SIGKILL, to the engine and its children


def stop_engines(engines) -> None:
    """Stop every ``Engine`` of ``engines``, shutting them down together."""
    for e in engines:
        e.ask_to_exit()
    for e in engines:
        e.stop()


class HttpProcess:
    """An HTTP server command on a free port of 127.0.0.1 (``{port}`` in
    ``args`` is replaced), its output in ``log_dir``. ``wait`` blocks until
    ``health_path`` answers one of ``ok`` (see ``wait_http_healthy``)."""

    def __init__(self, name: str, args: list[str], log_dir: Path | None = None, *,
                 wait: bool = True, health_path: str = "/health", ok=(200,),
                 timeout_s: float = 60, host: str = "127.0.0.1", netns: str | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.netns = netns
        self.log_path = Path(log_dir or "/tmp") / f"{name}-{self.port}.log"
        self.log = open(self.log_path, "w")
        argv = [a.replace("{port}", str(self.port)).replace("{host}", host) for a in args]
        self.proc = subprocess.Popen((["ip", "netns", "exec", netns] if netns else []) + argv,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if wait:
            try:
                call_in(netns, wait_http_healthy, self.proc, self.url, timeout_s,
                        self.log_path, name, path=health_path, ok=ok)
            except BaseException:
                self.stop()
                raise

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        stop_group(self.proc)
        self.log.close()


KVBRIDGE = str(Path(sys.executable).parent / "kvbridge")


class Proxy(HttpProcess):
    """A real ``kvbridge proxy`` process (stopped with ``stop()``, its group too)."""

    def __init__(self, prefill: list[str], decode: list[str], *extra: str,
                 wait: bool = True, log_dir: Path | None = None, host: str = "127.0.0.1",
                 netns: str | None = None):
        args = [KVBRIDGE, "proxy", "--host", "{host}", "--port", "{port}",
                "--health-interval", "0.5"]
        for u in prefill:
            args += ["--prefill", u]
        for u in decode:
            args += ["--decode", u]
        # 503: up, but no healthy pair behind it (yet).
        super().__init__("proxy", args + list(extra), log_dir, wait=wait, ok=(200, 503),
                         host=host, netns=netns)


class VllmRouter(HttpProcess):
    """The real ``vllm-router`` package in P/D mode, as production users run it."""

    def __init__(self, prefill: list[str], decode: list[str], log_dir: Path, *extra: str,
                 host: str = "127.0.0.1", netns: str | None = None):
        args = [str(Path(sys.executable).parent / "vllm-router"), "--vllm-pd-disaggregation",
                "--host", "{host}", "--port", "{port}", "--kv-connector", "nixl"]
        for u in prefill:
            args += ["--prefill", u]
        for u in decode:
            args += ["--decode", u]
        super().__init__("vllm-router", args + list(extra), log_dir, health_path="/v1/models",
                         host=host, netns=netns)
