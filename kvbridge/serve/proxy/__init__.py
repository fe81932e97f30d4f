# SPDX-License-Identifier: Apache-2.0
"""``kvbridge proxy``: the OpenAI-compatible P/D router (see ``app``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tomllib
from pathlib import Path

from kvbridge.serve.proxy.backends import PICKERS, BackendPool, LayoutPairingError

__all__ = ["add_arguments", "main", "preflight"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="a prefill instance, e.g. http://127.0.0.1:8100 (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="a decode instance (repeatable)")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML with prefill = [...], "
                   "decode = [...] and any other option")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", choices=sorted(PICKERS), default="least-outstanding",
                   help="how to pick an instance per request")
    p.add_argument("--health-interval", type=float, default=2.0, metavar="S")
    p.add_argument("--startup-wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for every backend at start-up")
    p.add_argument("--kv-mode", choices=("pull", "stream"), default="pull",
                   help="pull: decode gets a request once prefill answered and reads its KV; "
                   "stream: both get it at once and decode reads the KV while prefill "
                   "computes it (KVBridgeConnector), or registers for prefill to write it "
                   "(vLLM's NixlPushConnector, after its first answer); other prefill "
                   "instances are pulled from")
    p.add_argument("--request-log", metavar="PATH",
                   help="append one JSON line per disaggregated request to PATH: its prefill "
                   "round trip, TTFT and hop (prefill's answer to decode's first token), "
                   "in ms")
    p.add_argument("--log-level", default="info")


def _load_config(args: argparse.Namespace) -> None:
    if not args.config:
        return
    path = Path(args.config)
    data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(
        path.read_text())
    args.prefill = list(args.prefill) + list(data.get("prefill", []))
    args.decode = list(args.decode) + list(data.get("decode", []))
    for key in ("host", "port", "policy", "health_interval", "startup_wait", "kv_mode",
                "request_log"):
        if key in data:
            setattr(args, key, data[key])


async def preflight(prefill: list[str], decode: list[str], wait_s: float = 0.0) -> None:
    """Health + layout pre-check once; raises ``LayoutPairingError``."""
    import httpx

    async with httpx.AsyncClient() as client:
        pool = BackendPool(prefill, decode, client)
        try:
            await pool.start(wait_s=wait_s)
        finally:
            await pool.stop()


def main(args: argparse.Namespace) -> int:
    import uvicorn

    _load_config(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.decode:
        print("kvbridge proxy: at least one --decode instance is required", file=sys.stderr)
        return 2
    try:
        asyncio.run(preflight(args.prefill, args.decode, args.startup_wait))
    except LayoutPairingError as e:
        print(f"kvbridge proxy: {e}", file=sys.stderr)
        return 2
    from kvbridge.serve.proxy.app import create_app

    app = create_app(args.prefill, args.decode, policy=args.policy,
                     health_interval_s=args.health_interval, kv_mode=args.kv_mode,
                     request_log=args.request_log)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=False)
    return 0
