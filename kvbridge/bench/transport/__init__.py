# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench transport``: pull latency and GB/s of every transport.

What is measured: a consumer (this process) pulls N scattered KV blocks from a
producer (a second process) over 127.0.0.1 through a kvbridge backend
(``tcp``, ``cma``, ``nixl``; whichever import here) exactly as an engine would:
the producer ``publish``es a fresh request id (a lease ends once it is read),
the consumer times ``pull(...)`` up to the handle reaching DONE. That window
holds everything a pull costs the caller: the control round trip (ask, grant,
read-done), the bytes moving, and the thread hand-offs. GB/s is bytes divided by
the median latency of several repetitions after one warm-up pull (which also
does the handshake and first-touches memory).

Blocks: vLLM's CPU layout ``[kv_heads, block_size, 2*head_size]`` bf16, two
layers, block ids drawn at random (non-contiguous, unsorted) on both sides.
Total bytes run from 4 KiB to 256 MiB; the block shape follows the size:

===========  ==========================  =====================  ===============
name         layer-block shape           bytes per layer-block  used for totals
===========  ==========================  =====================  ===============
``small``    [2, 16, 16] (custom)        1 KiB                  < 256 KiB
``tiny``     [2, 128, 128] (tiny model)  64 KiB                 < 64 MiB
``llama8b``  [8, 128, 256] (Llama-3-8B)  512 KiB                >= 64 MiB
===========  ==========================  =====================  ===============

Every byte is verified: the destination blocks are poisoned before each pull,
and after the last one the SHA-1 of the pulled blocks (in pull order) on the
consumer must equal the producer's of its blocks.

``--baselines`` measures, in the same run and for the same byte counts, one
contiguous buffer moved by

* ``memcpy``: one core, ``ctypes.memmove`` in this process;
* ``socket``: a request, then ``sendall`` / ``recv_into`` a preallocated buffer
  between two processes over 127.0.0.1 (TCP_NODELAY, SO_SNDBUF/SO_RCVBUF as
  kvbridge's TCP transport sets them);
* ``nixl-raw``: two NIXL agents (UCX backend, ``UCX_NET_DEVICES=lo``) in two
  processes: metadata exchanged once, descriptor lists prepared once per size,
  then per repetition ``make_prepped_xfer("READ")``, ``transfer`` and polling
  ``check_xfer_state`` to DONE. Only where ``nixl`` imports.

Each backend's GB/s is then given as a ratio to each baseline. Results go to
``benchmarks/results/transport[-quick].{json,md,png}``.

Modules: ``plan`` (sizes, block shapes, cases, arguments), ``memory`` (cache
contents, digests), ``procs`` (helper-process plumbing, result records),
``runner`` (the producer/consumer processes of the kvbridge backends),
``baselines`` (memcpy, raw socket, raw NIXL), ``report`` (ratios and costs as
data), ``render`` (tables, footer, JSON payload, plot) and ``command`` (``run``).
"""

from __future__ import annotations

import os

# UCX would otherwise probe every interface (and pick a slow or absent one);
# one host means loopback. Set before any NIXL agent exists, here or in the
# processes spawned from here (they inherit the environment); every module of
# this package is imported after this one.
os.environ.setdefault("UCX_NET_DEVICES", "lo")
# NIXL logs every agent's creation at INFO on stdout, into the printed table.
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

from kvbridge.bench.transport.command import run  # noqa: E402
from kvbridge.bench.transport.memory import (  # noqa: E402
    cache_digest,
    digest,
    fill_random,
    make_cache,
    poison_blocks,
)
from kvbridge.bench.transport.plan import (  # noqa: E402
    BLOCK_SHAPES,
    Case,
    Plan,
    add_arguments,
    build_plan,
    make_plan,
    parse_size,
    parse_sizes,
)

__all__ = [
    "BLOCK_SHAPES", "Case", "Plan", "add_arguments", "build_plan", "cache_digest", "digest",
    "fill_random", "make_cache", "make_plan", "parse_size", "parse_sizes", "poison_blocks",
    "run",
]
