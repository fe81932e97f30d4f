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
releases the lease - the only completion signal the producer acts on, so
nothing is released twice. READs carry no NIXL notification: one made every
small READ wait for the message's delivery and cost ~110 µs of a 4 KiB
pull's ~360 (measured here over UCX shared memory), for a count nothing used.
The producer's agent thread still polls for notifications, which is what
progresses its UCX worker (transports such as tcp need the target's
progress), and counts any an older consumer sends
(``metrics()["nixl_notifs"]``).

Each agent has its own thread, which creates it, polls what is in flight and
tears it down; a consumer's reader thread starts its own READs (over shared
memory UCX copies inside ``transfer()``, so a small READ is over before the
call returns, and a hand-off to the agent thread and back cost two thread
wake-ups, ~100 µs of a 4 KiB pull). Calls on an agent never overlap: each
holds the agent's lock, and the agent runs in NIXL's ``STRICT`` sync mode,
made for calls from several threads one at a time. (Unserialized calls were
measured to crash: a segfault in ucp progress, in the producer, after a
consumer abandoned a READ over UCX's TCP transport.)

A verified pull of whole blocks of 8 MiB or more is READ in pieces of
``PIECE_BYTES`` (two in flight), each digested on another thread as soon as it
landed, instead of one READ and then a digest pass over memory.

A pull cancelled mid-flight completes (as with the other backends): NIXL can
abort a READ, but UCX may still land bytes in the local blocks afterwards (seen
over TCP), so an abort is kept for a stalled transfer, a vanished producer and
``close()`` - which waits up to ``CLOSE_GRACE_S`` for READs in flight first.
The agent is destroyed before ``close()`` returns, so no byte lands after.

Tunables (environment, read at import) with their defaults: ``config.py``
(``KVBRIDGE_NIXL_BACKEND``, ``KVBRIDGE_NIXL_UCX_ERROR_MODE``,
``KVBRIDGE_NIXL_PROGRESS_THREAD``, ``KVBRIDGE_NIXL_NOTIF_POLL_S``,
``KVBRIDGE_NIXL_PIECE_BYTES``).

UCX itself reads ``UCX_TLS``, ``UCX_NET_DEVICES`` (set it - e.g. ``lo`` on one
host - or UCX may bind every interface) and friends. Like vLLM's
NixlConnector, this package sets ``UCX_MEM_MMAP_HOOK_MODE=none`` (unless set)
before importing nixl: UCX's mmap hooks leak memory under PyTorch.
"""

from __future__ import annotations

# Re-exported: importable here when the backend was one module.
from kvbridge.transport.nixl.agent import (  # noqa: F401
    _IMPORT_ERROR,
    AgentThread,
    Read,
    _new_agent,
    _ucx_error_modes,
    nixl_agent,
    nixl_agent_config,
)
from kvbridge.transport.nixl.config import (
    BACKEND,
    CLOSE_GRACE_S,
    IDLE_POLL_S,
    LIVENESS_S,
    NOTIF_POLL_S,
    PROGRESS_THREAD,
    SPIN_S,
    UCX_ERROR_MODE,
)
from kvbridge.transport.nixl.descriptors import PeerData
from kvbridge.transport.nixl.transport import NixlTransport

_AgentThread, _Read, _PeerData = AgentThread, Read, PeerData

__all__ = ["BACKEND", "CLOSE_GRACE_S", "IDLE_POLL_S", "LIVENESS_S", "NOTIF_POLL_S",
           "PROGRESS_THREAD", "SPIN_S", "UCX_ERROR_MODE", "NixlTransport"]
