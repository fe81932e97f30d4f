# SPDX-License-Identifier: Apache-2.0
"""The NIXL backend's tunables: environment variables read once, at import,
and the fixed timings of its agent threads."""

from __future__ import annotations

import os

# Must be set before UCX loads, i.e. before nixl is imported (``agent.py``
# imports this module first): UCX's mmap hooks leak memory under PyTorch.
os.environ.setdefault("UCX_MEM_MMAP_HOOK_MODE", "none")

#: ``KVBRIDGE_NIXL_BACKEND``: NIXL backend plugin ["UCX"].
BACKEND = os.environ.get("KVBRIDGE_NIXL_BACKEND", "UCX")
#: ``KVBRIDGE_NIXL_UCX_ERROR_MODE``: UCX ``ucx_error_handling_mode``, "peer" or
#: "none" ["": auto - "none" when ``UCX_TLS`` names shared-memory transports
#: only (UCX cannot create such an endpoint in "peer" mode), else "peer" (peer
#: failures are reported), falling back to "none" if the backend refuses it].
UCX_ERROR_MODE = os.environ.get("KVBRIDGE_NIXL_UCX_ERROR_MODE", "")
#: ``KVBRIDGE_NIXL_PROGRESS_THREAD``: "1" runs NIXL's progress thread in both
#: agents ["0": on 2 cores it halved the throughput of a 64 MiB READ, and
#: polling ``check_xfer_state`` progresses the consumer anyway].
PROGRESS_THREAD = os.environ.get("KVBRIDGE_NIXL_PROGRESS_THREAD", "0") == "1"
#: ``KVBRIDGE_NIXL_NOTIF_POLL_S``: producer's notification poll interval while
#: a granted read is outstanding; each poll also progresses its UCX worker,
#: which transports that need the target's help (TCP) rely on [0.001].
NOTIF_POLL_S = float(os.environ.get("KVBRIDGE_NIXL_NOTIF_POLL_S", "0.001"))
#: After granting a read the producer polls without pause this long, then
#: every ``NOTIF_POLL_S``: a small READ needs the producer's progress at once
#: (over UCX tcp), a long one only now and then.
GRANT_SPIN_S = 0.002
#: Producer's poll interval with no read outstanding: notifications are then
#: only late stats, and a 1 ms wakeup would cost an idle server CPU.
IDLE_POLL_S = 0.05
#: Spin on check_xfer_state this long before yielding between polls. Over CMA
#: a READ completes inside transfer() itself; a remote one runs long enough
#: that a yield per round of polls costs nothing.
SPIN_S = 0.002
#: ``KVBRIDGE_NIXL_PIECE_BYTES``: a verified pull of whole blocks of at least
#: ``PIECE_MIN_BYTES`` is READ in pieces of about this many bytes, two in
#: flight, each digested on another thread as soon as it landed, instead of
#: one READ and then a digest pass over memory. Over shared memory here, three
#: alternations: 16 MiB 7.1-7.6 -> 7.7-8.0 GB/s, 64 MiB 11.1-11.5 -> 11.5-11.8,
#: 256 MiB 11.0-11.9 -> 12.2-12.5 - the copy and the digests share one
#: memory bus; where a NIC moves the bytes (RDMA: none here to measure) they
#: do not compete for a core. 0: one READ [4 MiB].
PIECE_BYTES = int(os.environ.get("KVBRIDGE_NIXL_PIECE_BYTES", 4 << 20))
PIECE_MIN_BYTES = 8 << 20
#: How often a pull in flight checks its control connection and deadline.
LIVENESS_S = 0.05
#: How long close() lets READs in flight finish before aborting them.
CLOSE_GRACE_S = 1.0
