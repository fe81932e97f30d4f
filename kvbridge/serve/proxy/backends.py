# SPDX-License-Identifier: Apache-2.0
"""Backends of the router: health, load, and the layout pre-check.

Every backend is polled on ``/health``. A backend that fails is taken out of
rotation and put back when healthy again - but only after the layout
pre-check passes: the router asks each instance what it is with a one-token
request carrying ``kv_transfer_params={"kvbridge_describe": true}``
(KVBridgeConnector answers with its layout in the response's
``kv_transfer_params``) and refuses to pair a prefill and a decode instance
whose layouts differ, naming every differing field.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from kvbridge.errors import ErrorCode, KVBridgeError
from kvbridge.layout import (
    KVLayout,
    LayoutMismatchError,
    check_pairable,
    layout_differences,
)

logger = logging.getLogger("kvbridge.serve.proxy")


@dataclass
class Backend:
    url: str
    role: str  # "prefill" | "decode"
    healthy: bool = False
    outstanding: int = 0
    served: int = 0
    failures: int = 0
    layout: KVLayout | None = None
    describe: dict | None = None
    #: why the layout pre-check keeps this backend out (None: it may pair)
    quarantine: str | None = None
    last_error: str | None = None
    models: list[str] = field(default_factory=list)
    max_model_len: int | None = None
    #: a prefill instance running vLLM's NixlPushConnector: the coordinates
    #: its answers carry, with which decode registers at once (``--kv-mode stream``)
    push_coords: dict | None = None

    @property
    def usable(self) -> bool:
        return self.healthy and self.quarantine is None

    def as_dict(self) -> dict:
        return {"url": self.url, "role": self.role, "healthy": self.healthy,
                "outstanding": self.outstanding, "served": self.served,
                "layout_fingerprint": self.layout.fingerprint() if self.layout else None,
                "quarantine": self.quarantine, "last_error": self.last_error}


class Picker(Protocol):
    """Chooses one backend among usable ones (pluggable policy)."""

    def pick(self, candidates: list[Backend]) -> Backend: ...


class LeastOutstanding:
    """Fewest requests in flight; ties go to the one that served fewer."""

    def pick(self, candidates: list[Backend]) -> Backend:
        return min(candidates, key=lambda b: (b.outstanding, b.served))


class RoundRobin:
    """Each role in turn, and over time every (prefill, decode) pairing.

    The pool keeps one instance per role. Two plain round robins in lockstep
    would pair p0 with d0 and p1 with d1 forever (whenever the pool sizes
    share a factor), so decode's turn slips by one every ``shift_every``
    turns (the sizes' least common multiple): sequential requests walk
    through every pairing - p0/d0, p1/d1, p0/d1, p1/d0 for two of each -
    while each pool stays evenly loaded."""

    def __init__(self) -> None:
        self.turns = 0

    def pick(self, candidates: list[Backend], shift_every: int = 0) -> Backend:
        slip = self.turns // shift_every if shift_every else 0
        chosen = candidates[(self.turns + slip) % len(candidates)]
        self.turns += 1
        return chosen


PICKERS = {"least-outstanding": LeastOutstanding, "round-robin": RoundRobin}


class LayoutPairingError(KVBridgeError, RuntimeError):
    """A prefill and a decode instance cannot exchange KV; names the fields."""

    code = ErrorCode.LAYOUT


def describe_mismatches(prefill: list[Backend], decode: list[Backend]) -> list[str]:
    """One line per incompatible (prefill, decode) pair."""
    out = []
    for p in prefill:
        for d in decode:
            if p.layout is None or d.layout is None:
                continue
            try:
                # Different TP sizes pair when the heads can be split.
                check_pairable(d.layout, p.layout)
                continue
            except LayoutMismatchError:
                pass
            diffs = [(f, a, b) for f, a, b in layout_differences(p.layout, d.layout)
                     if f != "tp_rank"]
            if diffs:
                detail = "; ".join(f"{f}: prefill {a}, decode {b}" for f, a, b in diffs)
                out.append(f"{p.url} x {d.url}: {detail}")
    return out


class BackendPool:
    """Prefill and decode backends with health checks and the layout pre-check."""

    def __init__(self, prefill: list[str], decode: list[str], client: httpx.AsyncClient, *,
                 picker: Picker | None = None, health_interval_s: float = 2.0,
                 model: str | None = None):
        self.prefill = [Backend(u.rstrip("/"), "prefill") for u in prefill]
        self.decode = [Backend(u.rstrip("/"), "decode") for u in decode]
        self.client = client
        self.picker = picker or LeastOutstanding()
        #: round robin keeps a turn per role (one shared counter would step
        #: twice per request and give one prefill and one decode everything)
        self._decode_picker = type(self.picker)() if isinstance(self.picker, RoundRobin) \
            else self.picker
        self.health_interval_s = health_interval_s
        self.model = model
        self._task: asyncio.Task | None = None
        self.on_change = None  # callback(backend) for metrics

    @property
    def all(self) -> list[Backend]:
        return self.prefill + self.decode

    # ------------------------------------------------------------------ picking
    def pick(self, role: str) -> Backend | None:
        pool = self.prefill if role == "prefill" else self.decode
        usable = [b for b in pool if b.usable]
        if not usable:
            return None
        if role == "decode" and isinstance(self._decode_picker, RoundRobin):
            prefills = max(1, sum(b.usable for b in self.prefill))
            return self._decode_picker.pick(usable, shift_every=math.lcm(prefills, len(usable)))
        return (self.picker if role == "prefill" else self._decode_picker).pick(usable)

    def models(self) -> list[str]:
        for b in self.decode + self.prefill:
            if b.models:
                return b.models
        return []

    def max_model_len(self) -> int | None:
        lens = [b.max_model_len for b in self.all if b.max_model_len]
        return min(lens) if lens else None

    # ------------------------------------------------------------------ health
    async def check(self, b: Backend) -> None:
        was = b.usable
        try:
            r = await self.client.get(b.url + "/health", timeout=3.0)
            ok = r.status_code == 200
            b.last_error = None if ok else f"/health answered {r.status_code}"
        except httpx.HTTPError as e:
            ok, b.last_error = False, f"{type(e).__name__}: {e}"
        if ok and not b.healthy:
            # (Re)joining: learn its models and layout before it takes traffic.
            try:
                await self._learn(b)
            except Exception as e:  # noqa: BLE001 - not ready yet: try next round
                ok, b.last_error = False, f"describe failed: {e}"
        b.healthy = ok
        if ok:
            self._recheck_pairing(b)
        if was != b.usable:
            logger.warning("kvbridge proxy: %s backend %s is now %s%s", b.role, b.url,
                           "in rotation" if b.usable else "out of rotation",
                           f" ({b.quarantine or b.last_error})" if not b.usable else "")
            if self.on_change:
                self.on_change(b)

    async def _learn(self, b: Backend) -> None:
        r = await self.client.get(b.url + "/v1/models", timeout=5.0)
        r.raise_for_status()
        data = r.json().get("data", [])
        b.models = [m["id"] for m in data]
        b.max_model_len = next((m.get("max_model_len") for m in data if m.get("max_model_len")),
                               None)
        model = self.model or (b.models[0] if b.models else None)
        body = {"model": model, "prompt": "0", "max_tokens": 1, "temperature": 0,
                "kv_transfer_params": {"kvbridge_describe": True}}
        r = await self.client.post(b.url + "/v1/completions", json=body, timeout=30.0)
        r.raise_for_status()
        info = (r.json().get("kv_transfer_params") or {}).get("kvbridge_describe")
        b.describe = info
        b.layout = KVLayout.from_dict(info["layout"]) if info and info.get("layout") else None
        if b.layout is None:
            logger.warning("kvbridge proxy: %s does not run KVBridgeConnector (no layout); "
                           "it is paired without the layout pre-check", b.url)

    def _recheck_pairing(self, b: Backend) -> None:
        others = self.decode if b.role == "prefill" else self.prefill
        peers = [o for o in others if o.healthy and o.layout is not None]
        if b.layout is None or not peers:
            b.quarantine = None
            return
        pairs = describe_mismatches([b], peers) if b.role == "prefill" \
            else describe_mismatches(peers, [b])
        if len(pairs) == len(peers):
            b.quarantine = "layout differs from every healthy peer: " + " | ".join(pairs)
            logger.error("kvbridge proxy: refusing to pair %s: %s", b.url, b.quarantine)
        else:
            b.quarantine = None

    async def start(self, wait_s: float = 0.0) -> None:
        """First health round (waiting up to ``wait_s`` for every backend), the
        strict layout pre-check, then the periodic health loop."""
        deadline = time.monotonic() + wait_s
        while True:
            await asyncio.gather(*(self.check(b) for b in self.all))
            if all(b.healthy for b in self.all) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.5)
        mismatches = describe_mismatches([b for b in self.prefill if b.healthy],
                                         [b for b in self.decode if b.healthy])
        if mismatches:
            raise LayoutPairingError("KV layouts of prefill and decode instances differ; "
                                     "refusing to pair them:\n  " + "\n  ".join(mismatches))
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self.check(b) for b in self.all), return_exceptions=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
