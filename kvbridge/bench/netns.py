# SPDX-License-Identifier: Apache-2.0
"""Hosts on one machine: network namespaces joined by veth pairs to a bridge
(for the multi-host tests and `benchmarks/multihost/`).

``Hosts(n)`` creates ``n`` namespaces, each with a ``lo`` and an ``eth0``
holding ``10.<net>.0.<i+1>/24``, joined through a bridge that lives in a
namespace of its own, so the root namespace gets no interface and no address.
Everything is removed on exit, also when the test failed, and namespaces left
by a killed run (their owner pid, registered in ``REGISTRY``, is gone) are
removed first.

Needs root and ``ip`` (iproute2); ``tc`` (netem) is optional. Processes enter
a host with ``ip netns exec NAME ...`` (``host.cmd``), or, for a Python
child process, ``enter(name)`` before it opens sockets.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
from dataclasses import dataclass

PREFIX = "kvbt"
CLONE_NEWNET = 0x40000000


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    probe = f"{PREFIX}probe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def netem_available() -> str | None:
    """None if ``tc qdisc ... netem`` works here, else why not."""
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    with Hosts(1) as hosts:
        r = hosts[0].run("tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms",
                         check=False)
        if r.returncode != 0:
            return f"tc netem is unavailable: {r.stderr.strip()}"
    return None


def enter(name: str) -> None:
    """Move the calling thread into namespace ``name``: a fresh child process
    before it opens sockets, or a thread of its own (``call_in``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def call_in(name: str | None, fn, *args, **kw):
    """``fn(*args, **kw)`` with its sockets in namespace ``name`` (None: here).

    A network namespace belongs to a thread, so ``fn`` runs in a fresh thread
    that entered ``name`` first; the caller's own thread stays where it is."""
    if name is None:
        return fn(*args, **kw)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, initializer=enter, initargs=(name,)) as pool:
        return pool.submit(fn, *args, **kw).result()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


@dataclass
class Host:
    name: str
    address: str
    #: the host's interface on the shared link
    device: str = "eth0"

    def cmd(self, *argv: str) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.cmd(*argv), capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name}: {r.stderr.strip()}")
        return r

    def link(self, up: bool) -> None:
        """Take this host's link down (cable pulled) or bring it back."""
        self.run("ip", "link", "set", self.device, "up" if up else "down")

    def netem(self, *spec: str) -> None:
        """``tc qdisc replace ... netem SPEC`` on the link (``()``: remove it)."""
        if spec:
            self.run("tc", "qdisc", "replace", "dev", self.device, "root", "netem", *spec)
        else:
            self.run("tc", "qdisc", "del", "dev", self.device, "root", check=False)


class Hosts:
    """``n`` hosts on one bridged link (see the module docs)."""

    def __init__(self, n: int):
        self.n = n
        self.tag = f"{PREFIX}{random.randrange(16 ** 6):06x}"
        self.net = random.randrange(64, 250)
        self.bridge_ns = f"{self.tag}br"
        self.hosts: list[Host] = []

    def __enter__(self) -> list[Host]:
        remove_stale()
        os.makedirs(REGISTRY, exist_ok=True)
        with open(os.path.join(REGISTRY, self.tag), "w") as f:
            f.write(str(os.getpid()))
        try:
            _ip("netns", "add", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i in range(self.n):
                host = Host(f"{self.tag}h{i}", f"10.{self.net}.0.{i + 1}")
                _ip("netns", "add", host.name)
                self.hosts.append(host)
                peer = f"{self.tag}p{i}"
                # Both ends are made in the bridge namespace, then one moves.
                _ip("-n", self.bridge_ns, "link", "add", peer, "type", "veth", "peer", "name",
                    "eth0", "netns", host.name)
                _ip("-n", self.bridge_ns, "link", "set", peer, "master", "br0")
                _ip("-n", self.bridge_ns, "link", "set", peer, "up")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.name, "link", "set", "eth0", "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self.hosts

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for name in [h.name for h in self.hosts] + [self.bridge_ns]:
            kill_processes_in(name)
            _ip("netns", "del", name, check=False)
        self.hosts = []
        try:
            os.unlink(os.path.join(REGISTRY, self.tag))
        except FileNotFoundError:
            pass

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]


def kill_processes_in(name: str) -> None:
    """SIGKILL what still runs in namespace ``name`` (a test's leftovers)."""
    r = _ip("netns", "pids", name, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


#: tag -> the pid of the process that made those namespaces
REGISTRY = "/run/kvbridge-test-netns"


def remove_stale() -> None:
    """Namespaces made by a process that is gone (a killed test run)."""
    if not os.path.isdir(REGISTRY):
        return
    names = _ip("netns", "list", check=False).stdout.split()
    for tag in os.listdir(REGISTRY):
        path = os.path.join(REGISTRY, tag)
        try:
            owner = int(open(path).read().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and _alive(owner):
            continue
        for name in names:
            if name.startswith(tag):
                kill_processes_in(name)
                _ip("netns", "del", name, check=False)
        os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
