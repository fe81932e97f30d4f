# SPDX-License-Identifier: Apache-2.0
"""What ``kvbridge bench transport`` measures: sizes, block shapes, cases, series
and timing, from the command's arguments (``add_arguments``, ``build_plan``)."""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from kvbridge.bench.common import fmt_bytes

KiB, MiB = 1 << 10, 1 << 20

#: name -> (kv_heads, block_size, head_size); vLLM CPU layout, bf16.
BLOCK_SHAPES: dict[str, tuple[int, int, int]] = {
    "small": (2, 16, 8),       # custom: 1 KiB per layer-block, for the smallest totals
    "tiny": (2, 128, 64),      # the tiny model: 64 KiB per layer-block
    "llama8b": (8, 128, 128),  # Llama-3-8B per layer: 2 x 8 x 128 x 128 x bf16 = 512 KiB
}
NUM_LAYERS = 2
FULL_SIZES = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB,
              256 * MiB]
QUICK_SIZES = [64 * KiB, 1 * MiB, 64 * MiB]
BASELINES = ("memcpy", "socket", "nixl-raw")
#: Byte written over destination blocks before every pull, so stale data from
#: an earlier repetition can never pass verification.
POISON = 0xA5
SEED = 1234
PULL_TIMEOUT_S = 120.0
#: How long a helper process may take to start (spawn, import torch / nixl).
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    """One total size: ``blocks`` blocks of ``shape`` (all layers) = ``nbytes``."""

    nbytes: int
    shape: str
    blocks: int


def layer_block_bytes(shape: str) -> int:
    heads, block_size, head_size = BLOCK_SHAPES[shape]
    return heads * block_size * 2 * head_size * 2  # bf16


def block_bytes_all_layers(shape: str) -> int:
    return NUM_LAYERS * layer_block_bytes(shape)


def auto_shape(nbytes: int) -> str:
    """The smallest totals need a small custom block (two blocks of the tiny
    model are already 256 KiB); Llama-sized blocks from 64 MiB up."""
    if nbytes < 256 * KiB:
        return "small"
    if nbytes < 64 * MiB:
        return "tiny"
    return "llama8b"


def make_plan(sizes: Sequence[int], block: str = "auto") -> tuple[list[Case], list[str]]:
    """Cases for ``sizes`` and notes on sizes that cannot be made of >= 2 whole blocks."""
    cases, skipped = [], []
    for nbytes in sizes:
        shape = auto_shape(nbytes) if block == "auto" else block
        per_block = block_bytes_all_layers(shape)
        # At least two blocks: with one there is nothing to scatter.
        if nbytes % per_block or nbytes // per_block < 2:
            skipped.append(f"{fmt_bytes(nbytes)} is not >= 2 whole {shape} blocks "
                           f"({fmt_bytes(per_block)} each)")
            continue
        cases.append(Case(nbytes, shape, nbytes // per_block))
    return cases, skipped


def parse_sizes(text: str) -> list[int]:
    """A comma-separated ``--sizes`` value."""
    return [parse_size(s) for s in text.split(",") if s.strip()]


def parse_size(text: str) -> int:
    """``4K``, ``64KiB``, ``1M``, ``256MiB``, ``1G`` or plain bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 4K, 1M, 256M)") from None



def block_ids(case: Case, num_blocks: int, side: str) -> list[int]:
    """Random, non-contiguous, unsorted ids; the same for every backend."""
    return random.Random(f"{side}-{case.shape}-{case.blocks}").sample(range(num_blocks),
                                                                     case.blocks)


def series_name(backend: str, checksum: bool) -> str:
    """``tcp`` (end-to-end checksums on, the default) or ``tcp-nocsum``."""
    return backend if checksum else f"{backend}{NO_CHECKSUM}"


NO_CHECKSUM = "-nocsum"


# -- timing --------------------------------------------------------------------------------

#: A measurement whose samples spread more than this (interquartile range over
#: the median) is noisy: the full run repeats it longer, and a cell or ratio
#: built on it is flagged "~" as too noisy to judge.
NOISY_SPREAD = 0.25


@dataclass
class Timing:
    """How often each measurement repeats: at least ``min_reps`` times and
    ``min_time`` seconds; while its spread exceeds ``NOISY_SPREAD``, on up to
    ``settle_time`` seconds (0: never) - always at most ``max_reps`` times."""

    min_reps: int
    min_time: float
    max_reps: int = 200
    settle_time: float = 0.0


# -- arguments -------------------------------------------------------------------------------

def _add(parser: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    # The ``bench`` parser may already define the flags every benchmark shares
    # (--quick, --json); reuse those instead of clashing with them.
    if any(f in parser._option_string_actions for f in flags):
        return
    parser.add_argument(*flags, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvbridge bench transport``."""
    _add(parser, "--quick", action="store_true",
         help="64 KiB, 1 MiB and 64 MiB only (under a minute)")
    _add(parser, "--json", metavar="PATH", help="also write the results here")
    _add(parser, "--baselines", action="store_true",
         help="also measure memcpy, a raw socket and raw NIXL (if installed) on the same "
              "bytes, and give each backend's ratio to them")
    _add(parser, "--backends", metavar="LIST",
         help="comma-separated kvbridge backends (default: every available one)")
    _add(parser, "--sizes", metavar="LIST", type=parse_sizes,
         help="comma-separated total sizes, e.g. 4K,1M,256M (default: 4 KiB ... 256 MiB "
              "in steps of 4x)")
    _add(parser, "--block", choices=["auto", *BLOCK_SHAPES], default="auto",
         help="block shape for every size (default: by size, see the module docs)")
    _add(parser, "--checksum", choices=["both", "on", "off"], default="both",
         help="end-to-end KV checksums: measure each backend with them (the default "
              "config) and without (series NAME-nocsum), or only one way [both]")
    _add(parser, "--reps", type=int, default=5,
         help="least repetitions per measurement; the median is reported [5]")
    two_hosts = parser.add_mutually_exclusive_group()
    two_hosts.add_argument(
        "--listen", metavar="ADDR:PORT",
        help="two hosts: run the far ends (producers, baseline peers) here, listening on "
             "ADDR:PORT, until Ctrl-C; the other host runs --connect ADDR:PORT. Both set "
             "$KVBRIDGE_SECRET alike, and UCX_NET_DEVICES to the link's device for nixl")
    two_hosts.add_argument(
        "--connect", metavar="ADDR:PORT",
        help="two hosts: measure from here against the far ends of a --listen host (same "
             "table and files, named transport-remote; cma is same-host only and left out)")



# -- the plan of one run ---------------------------------------------------------------------

class PlanError(Exception):
    """Arguments that cannot be measured (a usage error, exit status 2)."""


@dataclass
class Plan:
    """Everything one run measures, resolved from the arguments."""

    quick: bool
    backends: list[str]
    cases: list[Case]
    #: Sizes left out, why (not >= 2 whole blocks).
    skipped: list[str]
    #: Checksum modes each backend runs with (True: on).
    modes: list[bool]
    baselines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timing: Timing = field(default_factory=lambda: Timing(5, 0.5))
    #: HOST:PORT of a ``--listen`` host running the far ends; None: this host
    connect: str | None = None

    @cached_property
    def peers(self):
        """Where the far ends run (``peers.Peers``: this host, or the listener);
        made once per run (a remote one looks up this host's route)."""
        from kvbridge.bench.transport.peers import Peers, RemotePeers

        return RemotePeers(self.connect) if self.connect else Peers()

    @property
    def runs(self) -> list[tuple[str, bool]]:
        """(backend, checksum) of every kvbridge series, in run order."""
        return [(b, c) for b in self.backends for c in self.modes]

    @property
    def kv_series(self) -> list[str]:
        return [series_name(b, c) for b, c in self.runs]

    @property
    def series(self) -> list[str]:
        return [*self.kv_series, *self.baselines]

    @property
    def with_checksums(self) -> list[str]:
        """The series the baseline ratios are given for."""
        return ([series_name(b, True) for b in self.backends] if True in self.modes
                else self.kv_series)

    @property
    def blocks(self) -> dict[str, int]:
        """Blocks per cache, by shape: scattered ids need room, so caches hold
        twice the most blocks a case pulls."""
        return {shape: max(4, 2 * max(c.blocks for c in self.cases if c.shape == shape))
                for shape in dict.fromkeys(c.shape for c in self.cases)}


def nixl_importable() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


def select_backends(requested: str | None) -> list[str]:
    """``--backends`` resolved against what imports here; PlanError if unknown."""
    from kvbridge.transport import ALIASES, BACKENDS, available

    here = available()
    if not requested:
        # auto moves bytes as cma does on one host (tcp across): measured by
        # those two, unless asked for by name.
        return [b for b in here if b != "auto"]
    backends: list[str] = []
    for name in (n.strip() for n in requested.split(",") if n.strip()):
        key = ALIASES.get(name, name)
        if key not in BACKENDS:
            raise PlanError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}")
        if key not in here:
            raise PlanError(f"backend {key!r} is not available here (its dependency does not "
                            f"import); available: {here}")
        if key not in backends:
            backends.append(key)
    return backends


def build_plan(args: argparse.Namespace) -> Plan:
    """The plan for ``args``; its ``cases`` may be empty (see ``skipped``)."""
    quick = bool(getattr(args, "quick", False))
    backends = select_backends(getattr(args, "backends", None))
    connect = getattr(args, "connect", None)
    notes = []
    if connect and "cma" in backends:
        backends.remove("cma")
        notes.append("cma skipped: cross-memory attach reaches processes of this host only")
    sizes_arg = getattr(args, "sizes", None)
    if isinstance(sizes_arg, str):
        sizes_arg = parse_sizes(sizes_arg)
    sizes = sizes_arg or (QUICK_SIZES if quick else FULL_SIZES)
    cases, skipped = make_plan(sorted(set(sizes)), getattr(args, "block", "auto") or "auto")
    modes = {"both": [True, False], "on": [True], "off": [False]}[
        getattr(args, "checksum", None) or "both"]
    plan = Plan(quick, backends, cases, skipped, modes, notes=notes, connect=connect,
                timing=Timing(min_reps=max(1, getattr(args, "reps", 5) or 5),
                              min_time=0.15 if quick else 0.5,
                              settle_time=0.0 if quick else 3.0))
    if getattr(args, "baselines", False) and cases:
        plan.baselines = ["memcpy", "socket"]
        if nixl_importable():
            plan.baselines.append("nixl-raw")
        else:
            plan.notes.append("nixl-raw skipped: nixl does not import here")
    return plan
