# SPDX-License-Identifier: Apache-2.0
"""Transports: one interface (``base.Transport``), one module per medium.

=========  ==================================================================
``tcp``    built in; bytes on the control connection, sendmsg/recvmsg_into
           straight from and into cache blocks.
``cma``    same host: the consumer reads the producer's blocks directly with
           ``process_vm_readv`` (cross-memory attach), no copy in between.
``nixl``   NIXL agents (UCX backend): RDMA on real fabrics, shared memory or
           TCP on one host. Needs the ``nixl`` package.
=========  ==================================================================
"""

from __future__ import annotations

import importlib

from kvbridge.cache.blocks import PagedKVCache
from kvbridge.errors import TransferError
from kvbridge.transport.base import Transport
from kvbridge.transport.config import TransportConfig
from kvbridge.transport.handle import TransferHandle, TransferState
from kvbridge.transport.leases import LeaseTable

#: name -> "module:Class"
BACKENDS = {
    "tcp": "kvbridge.transport.tcp:TcpTransport",
    "cma": "kvbridge.transport.cma:CmaTransport",
    "nixl": "kvbridge.transport.nixl:NixlTransport",
}
ALIASES = {"same-host": "cma", "shm": "cma"}


def transport_class(name: str) -> type[Transport]:
    key = ALIASES.get(name, name)
    if key not in BACKENDS:
        raise ValueError(f"unknown transport {name!r}; choose from {sorted(BACKENDS)}")
    module, cls = BACKENDS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def create_transport(name: str, cache: PagedKVCache, config: TransportConfig | None = None,
                     **kw) -> Transport:
    return transport_class(name)(cache, config, **kw)


def available() -> list[str]:
    """Backends whose dependencies import here."""
    out = []
    for name in BACKENDS:
        try:
            cls = transport_class(name)
        except ImportError:
            continue
        if getattr(cls, "is_available", lambda: True)():
            out.append(name)
    return out


__all__ = ["BACKENDS", "LeaseTable", "TransferError", "TransferHandle", "TransferState",
           "Transport", "TransportConfig", "available", "create_transport", "transport_class"]
