# SPDX-License-Identifier: Apache-2.0
"""NIXL descriptor math: one descriptor row per (region, block, run), the
prepped descriptor lists kept per producer and per TP slice shape, and the
row indices of one pull."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbridge.cache.blocks import run_starts
from kvbridge.cache.shard import BlockSlice


@dataclass(eq=False)  # kept in a set by identity
class PeerData:
    """Consumer-side NIXL state of one producer connection."""

    remote_agent: Any
    num_blocks: int
    remote_dlist: Any
    #: for slice descriptor lists made later: (base, stride) per region
    regions: list
    block_bytes: int
    dev_id: int
    mem_type: str
    #: (offset, length, rows) -> prepared remote dlist of that slice's runs
    slice_dlists: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: bool = False  # a READ is in flight: its reader thread releases us
    closed: bool = False
    released: bool = False


def block_descs(regions: list[tuple[int, int]], num_blocks: int, dev_id: int,
                block_bytes: int, sl: BlockSlice | None = None) -> np.ndarray:
    """(addr, len, dev) rows; row ``(region * num_blocks + block) * rows +
    run`` is that run of that block (``sl``: a TP slice of ``rows`` runs;
    default the whole block, one run)."""
    starts = run_starts(regions, block_bytes, range(num_blocks), sl)
    out = np.empty((len(starts), 3), dtype=np.uint64)
    out[:, 0] = starts
    out[:, 1] = sl.length if sl is not None else block_bytes
    out[:, 2] = dev_id
    return out


#: Up to this many descriptor rows a pull's indices are built as Python
#: lists: numpy's fixed cost per operation (a dozen of them) was 18-20 us of a
#: 4 KiB pull. NIXL takes lists and int32 arrays alike.
SMALL_READ_ROWS = 512


def read_indices(num_regions: int, rows: int, local_blocks: int, local_ids,
                 remote_blocks: int, remote_ids) -> tuple:
    """Rows of the local and remote descriptor lists one pull reads (lists,
    or int32 arrays for large pulls): region-major, then block, then run -
    the staging order of every backend."""
    if num_regions * len(local_ids) * rows <= SMALL_READ_ROWS:
        runs = range(rows)
        return ([(r * local_blocks + b) * rows + k
                 for r in range(num_regions) for b in local_ids for k in runs],
                [(r * remote_blocks + b) * rows + k
                 for r in range(num_regions) for b in remote_ids for k in runs])
    regions = np.arange(num_regions, dtype=np.int64)[:, None, None]
    runs = np.arange(rows, dtype=np.int64)[None, None, :]
    local = np.asarray(local_ids, dtype=np.int64)[None, :, None]
    remote = np.asarray(remote_ids, dtype=np.int64)[None, :, None]
    local_idx = ((regions * local_blocks + local) * rows + runs).ravel()
    remote_idx = ((regions * remote_blocks + remote) * rows + runs).ravel()
    return local_idx.astype(np.int32), remote_idx.astype(np.int32)


def agent_key(agent_name) -> bytes:
    return agent_name if isinstance(agent_name, bytes) else str(agent_name).encode()


def agent_label(agent_name) -> str:
    return agent_name.decode() if isinstance(agent_name, bytes) else str(agent_name)
