# SPDX-License-Identifier: Apache-2.0
"""Transports: one interface (``base.Transport``), one module per medium.

=========  ==================================================================
``auto``   the default: ``cma`` to producers on this host, ``tcp`` to the
           rest, chosen per producer; ``nixl`` where RDMA is present.
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
    "auto": "kvbridge.transport.auto:AutoTransport",
    "tcp": "kvbridge.transport.tcp:TcpTransport",
    "cma": "kvbridge.transport.cma:CmaTransport",
    "nixl": "kvbridge.transport.nixl:NixlTransport",
}
ALIASES = {"same-host": "cma", "shm": "cma"}


#: The transport when none is configured.
DEFAULT = "auto"


def transport_class(name: str) -> type[Transport]:
    key = ALIASES.get(name, name)
    if key not in BACKENDS:
        raise ValueError(f"unknown transport {name!r}; choose from {sorted(BACKENDS)}")
    if key == "auto":
        from kvbridge.transport.auto import rdma_devices, resolve

        # Only where RDMA is present is nixl even looked for (importing it
        # loads UCX, which costs a second and memory).
        if rdma_devices():
            key = resolve(_nixl_available())
    module, cls = BACKENDS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def create_transport(name: str, cache: PagedKVCache, config: TransportConfig | None = None,
                     **kw) -> Transport:
    return transport_class(name)(cache, config, **kw)


def _nixl_available() -> bool:
    try:
        cls = transport_class("nixl")
    except ImportError:
        return False
    return cls.is_available()


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


__all__ = ["BACKENDS", "DEFAULT", "LeaseTable", "TransferError", "TransferHandle", "TransferState",
           "Transport", "TransportConfig", "available", "create_transport", "transport_class"]
