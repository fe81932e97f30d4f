# SPDX-License-Identifier: Apache-2.0
"""``auto`` (the default): the fastest medium for each producer, unconfigured.

As UCX does for NIXL, the consumer picks per producer:

* **cma** when the producer runs on this host, in this PID namespace, and its
  memory is readable from here (same user, ptrace allowed): direct
  cross-process reads, the fastest medium on one host;
* **tcp** otherwise (another host, a container boundary, ptrace refused, or a
  producer that serves only tcp).

Network namespaces alone do not make another host: two processes of one
machine in different network namespaces but one PID namespace read each other
by cma, past any link between the namespaces (set ``tcp`` to test a link).

It asks for cma first; the producer refuses a consumer of another host (code
``backend``), and the consumer's one-byte probe read finds a refused ptrace:
either way it connects again asking for tcp, once per producer, and logs why.
A producer serves both media on its one listener, choosing per connection
what the consumer asked for, so a ticket of an ``auto`` producer is readable
by an ``auto``, ``tcp`` or ``cma`` consumer.

With an RDMA device on this host (``/sys/class/infiniband``) and ``nixl``
installed, ``auto`` is ``nixl`` instead: UCX then moves bytes by RDMA across
hosts and by shared memory on one (``resolve``). The choice is logged, and
reported per producer connection in ``metrics()["media"]``.
"""

from __future__ import annotations

import logging
import os
import socket

from kvbridge import protocol as P
from kvbridge.cache.shard import BlockSlice
from kvbridge.errors import ErrorCode, KVBridgeError, TransferError
from kvbridge.transport.cma import CmaTransport
from kvbridge.transport.base import Transport
from kvbridge.transport.handle import TransferHandle
from kvbridge.transport.peer import PeerConnection
from kvbridge.transport.server import ServerConn
from kvbridge.transport.tcp import TcpTransport

logger = logging.getLogger("kvbridge.transport")

#: Where Linux lists RDMA devices (InfiniBand, RoCE, iWARP).
RDMA_SYSFS = "/sys/class/infiniband"
#: The media an ``AutoTransport`` serves and tries, fastest first.
MEDIA = ("cma", "tcp")


def rdma_devices(sysfs: str = RDMA_SYSFS) -> list[str]:
    """RDMA devices of this host (empty without any)."""
    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []


def resolve(nixl_available: bool, devices: list[str] | None = None) -> str:
    """The backend ``auto`` stands for here: ``nixl`` with an RDMA device and
    nixl installed, else ``auto`` (cma or tcp per producer)."""
    devices = rdma_devices() if devices is None else devices
    if devices and nixl_available:
        logger.info("kvbridge: transport auto -> nixl (RDMA devices %s)", ", ".join(devices))
        return "nixl"
    return "auto"


class AutoTransport(CmaTransport):
    """cma to producers of this host, tcp to the rest (see the module docs).
    The cma hooks are inherited; a tcp connection's go to ``TcpTransport``."""

    name = "auto"
    reads_from = MEDIA

    def __init__(self, cache, config=None, **kw):
        #: cma reads host memory only: a device cache moves by tcp (staged)
        self._cma = cache.device.type == "cpu" and CmaTransport.is_available()
        if self._cma:
            super().__init__(cache, config, **kw)
        else:
            Transport.__init__(self, cache, config, **kw)
        #: producers cma cannot reach (learned at their first handshake)
        self._tcp_only: set[str] = set()

    @staticmethod
    def is_available() -> bool:
        return True  # tcp always works; cma is tried per producer

    # -- producer: one listener, the medium each consumer asked for --
    def _serves(self, medium: str) -> bool:
        return medium == "tcp" or (medium == "cma" and self._cma)

    def _server_accept_peer(self, info: dict, medium: str):
        if medium == "cma":
            return super()._server_accept_peer(info, medium)
        return None

    def _send_pull(self, conn: socket.socket, grant: P.PullGrant, ids: list[int],
                   state: ServerConn, block_slice: BlockSlice | None = None) -> None:
        if state.medium == "tcp":
            TcpTransport._send_pull(self, conn, grant, ids, state, block_slice)
        else:
            super()._send_pull(conn, grant, ids, state, block_slice)

    # -- consumer: cma first, tcp if cma cannot reach the producer --
    def _medium_for(self, conn: PeerConnection) -> str:
        return "cma" if self._cma and conn.address not in self._tcp_only else "tcp"

    def _client_handshake_once(self, conn: PeerConnection, deadline: float) -> None:
        try:
            return super()._client_handshake_once(conn, deadline)
        except KVBridgeError as e:
            # BACKEND: the producer refused cma, or our probe read failed.
            if conn.medium != "cma" or e.code != ErrorCode.BACKEND:
                raise
            reason = e
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None
        self._tcp_only.add(conn.address)
        logger.info("kvbridge: auto: cma cannot reach producer %s (%s); using tcp",
                    conn.address, reason)
        return super()._client_handshake_once(conn, deadline)

    def _connect_data(self, conn: PeerConnection):
        if conn.medium != "cma":
            return None
        try:
            return super()._connect_data(conn)
        except (ValueError, PermissionError) as e:  # not this host, or ptrace refused
            raise TransferError(str(e), ErrorCode.BACKEND) from e

    def _receive_pull(self, conn: PeerConnection, handle: TransferHandle,
                      grant: P.PullGrant) -> bool:
        if conn.medium == "tcp":
            return TcpTransport._receive_pull(self, conn, handle, grant)
        return super()._receive_pull(conn, handle, grant)
