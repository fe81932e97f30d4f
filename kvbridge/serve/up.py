# SPDX-License-Identifier: Apache-2.0
"""``kvbridge up``: the one-command prefill/decode demo (and the same command
a user runs in production with a real model).

It builds the tiny model if no ``--model`` is given, starts N prefill and M
decode vLLM servers with KVBridgeConnector and a router (``kvbridge proxy``,
or ``vllm-router``) on 127.0.0.1, waits for health with a progress display,
sends a few chat and completion requests (one streaming) and prints each
answer with TTFT, ITL, KV bytes moved and transfer time. On exit or Ctrl-C it
stops every process it started, by pid, and checks the ports are free again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kvbridge.serve.launch import (
    VllmServer,
    kv_transfer_config,
    start_server,
    stop_all,
    stop_group,
    wait_healthy,
)

DEMO_CHAT = [
    [{"role": "user", "content": "What does the socket module provide?"}],
    [{"role": "system", "content": "You answer in one line."},
     {"role": "user", "content": "Explain how a thread pool executor shuts down. " * 8}],
]
DEMO_COMPLETION = ("Return a new list containing all items from the iterable in ascending "
                   "order. A custom key function can be supplied to customize the sort order, "
                   "and the reverse flag can be set to request the result in descending "
                   "order. ") * 6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model path or name (default: the tiny local model, built "
                   "if missing)")
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "cma", "nixl"],
                   help="how KV moves: auto (default) picks cma on one host, tcp across "
                        "hosts, nixl where RDMA is present")
    p.add_argument("--router", default="builtin", choices=["builtin", "vllm-router"])
    p.add_argument("--prefill-instances", type=int, default=1)
    p.add_argument("--decode-instances", type=int, default=1)
    p.add_argument("--port", type=int, default=8000, help="router port")
    p.add_argument("--prefill-port", type=int, default=8100, help="first prefill port")
    p.add_argument("--decode-port", type=int, default=8200, help="first decode port")
    p.add_argument("--kv-port", type=int, default=14579, help="first kvbridge port")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--log-dir", default=None, help="server logs (default: a temp dir)")
    p.add_argument("--serve", action="store_true", help="keep running after the demo "
                   "requests until Ctrl-C")
    p.add_argument("--startup-timeout", type=float, default=300.0)


class Stack:
    """Everything ``up`` started; ``stop()`` ends all of it."""

    def __init__(self) -> None:
        self.servers: list[VllmServer] = []
        self.router: subprocess.Popen | None = None
        self.ports: list[int] = []

    def stop(self) -> None:
        stop_group(self.router)
        stop_all(self.servers)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _check_ports(ports: list[int]) -> None:
    busy = [p for p in ports if not _port_free(p)]
    if busy:
        raise SystemExit(f"kvbridge up: ports {busy} are in use; pick others with --port, "
                         "--prefill-port, --decode-port, --kv-port")


def _progress(names: list[str], t0: float, done: dict) -> None:
    parts = [f"{n} {'ready' if n in done else '...'}" for n in names]
    line = f"\r[{time.monotonic() - t0:5.0f} s] waiting for health: " + ", ".join(parts)
    print(line + "\x1b[K" if sys.stdout.isatty() else line, end="" if sys.stdout.isatty()
          else "\n", flush=True)


def start_stack(args: argparse.Namespace, model: str, log_dir: Path, stack: Stack) -> str:
    n_p, n_d = args.prefill_instances, args.decode_instances
    p_ports = [args.prefill_port + i for i in range(n_p)]
    d_ports = [args.decode_port + i for i in range(n_d)]
    kv_ports = [args.kv_port + 16 * i for i in range(n_p + n_d)]
    _check_ports([args.port, *p_ports, *d_ports, *kv_ports])
    stack.ports = [args.port, *p_ports, *d_ports, *kv_ports]
    cores = os.cpu_count() or 1
    served = "tiny" if args.model is None else None
    for i, port in enumerate(p_ports):
        stack.servers.append(start_server(
            f"prefill{i}", model, port, cpu_core=i % cores, log_dir=log_dir,
            block_size=args.block_size, served_name=served,
            kv_config=kv_transfer_config("kv_producer", transport=args.transport,
                                         kv_port=kv_ports[i])))
    for i, port in enumerate(d_ports):
        stack.servers.append(start_server(
            f"decode{i}", model, port, cpu_core=(n_p + i) % cores, log_dir=log_dir,
            block_size=args.block_size, served_name=served,
            kv_config=kv_transfer_config("kv_consumer", transport=args.transport,
                                         kv_port=kv_ports[n_p + i])))
    names = [s.name for s in stack.servers]
    done: dict = {}
    t0 = time.monotonic()
    _progress(names, t0, done)

    def on_ready(server, elapsed):
        done[server.name] = elapsed
        _progress(names, t0, done)

    wait_healthy(stack.servers, args.startup_timeout, progress=on_ready)
    print()
    router_url = f"http://127.0.0.1:{args.port}"
    urls_p = [s.url for s in stack.servers if s.name.startswith("prefill")]
    urls_d = [s.url for s in stack.servers if s.name.startswith("decode")]
    if args.router == "builtin":
        cmd = [str(Path(sys.executable).parent / "kvbridge"), "proxy", "--port", str(args.port)]
        for u in urls_p:
            cmd += ["--prefill", u]
        for u in urls_d:
            cmd += ["--decode", u]
    else:
        exe = shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or "vllm-router"
        cmd = [exe, "--vllm-pd-disaggregation", "--host", "127.0.0.1", "--port", str(args.port),
               "--kv-connector", "nixl", "--decode-policy", "round_robin",
               "--prefill-policy", "round_robin"]
        for u in urls_p:
            cmd += ["--prefill", u]
        for u in urls_d:
            cmd += ["--decode", u]
    log = open(log_dir / "router.log", "wb")
    stack.router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    import httpx

    while True:
        if stack.router.poll() is not None:
            raise RuntimeError(f"router exited {stack.router.returncode}:\n"
                               + (log_dir / "router.log").read_text()[-3000:])
        try:
            if httpx.get(router_url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("router not ready after 60 s")
        time.sleep(0.3)
    # Every server inherits $KVBRIDGE_SECRET: set it and the KV connections
    # authenticate (a consumer without it is refused, naming auth).
    auth = "shared secret from $KVBRIDGE_SECRET" if os.environ.get("KVBRIDGE_SECRET") else \
        "off (set KVBRIDGE_SECRET to authenticate KV connections)"
    print(f"router ({args.router}) on {router_url}: {len(urls_p)} prefill, {len(urls_d)} decode "
          f"instance(s), transport {args.transport}, auth {auth}; logs in {log_dir}")
    return router_url


def run_requests(router_url: str, model_name: str, max_tokens: int) -> list[dict]:
    """The demo requests; returns per-request figures."""
    import httpx

    results = []
    jobs = [("chat", False, DEMO_CHAT[0]), ("chat", True, DEMO_CHAT[1]),
            ("completion", False, DEMO_COMPLETION)]
    with httpx.Client(timeout=300) as client:
        for i, (kind, stream, payload) in enumerate(jobs):
            path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
            body = {"model": model_name, "max_tokens": max_tokens, "temperature": 0,
                    "stream": stream}
            body["messages" if kind == "chat" else "prompt"] = payload
            t0 = time.perf_counter()
            arrivals, text, headers, usage = [], [], {}, None
            if stream:
                body["stream_options"] = {"include_usage": True}
                with client.stream("POST", router_url + path, json=body) as r:
                    headers = dict(r.headers)
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            raise RuntimeError(ev["error"]["message"])
                        usage = ev.get("usage") or usage
                        for c in ev.get("choices") or []:
                            piece = c.get("text") or (c.get("delta") or {}).get("content")
                            if piece:
                                arrivals.append(time.perf_counter())
                                text.append(piece)
            else:
                r = client.post(router_url + path, json=body)
                r.raise_for_status()
                arrivals.append(time.perf_counter())
                headers = dict(r.headers)
                data = r.json()
                usage = data.get("usage")
                c = data["choices"][0]
                text.append(c.get("text") or c["message"]["content"])
            end = time.perf_counter()
            itl = ((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) * 1e3
                   if len(arrivals) > 1 else None)
            results.append({
                "request": f"{kind}{' (stream)' if stream else ''}",
                "prompt_tokens": (usage or {}).get("prompt_tokens"),
                "completion_tokens": (usage or {}).get("completion_tokens"),
                "ttft_ms": (arrivals[0] - t0) * 1e3 if arrivals else None,
                "itl_ms": itl,
                "total_ms": (end - t0) * 1e3,
                "kv_bytes": headers.get("x-kvbridge-kv-bytes"),
                "transfer_ms": headers.get("x-kvbridge-transfer-ms"),
                "mode": headers.get("x-kvbridge-mode"),
                "text": "".join(text),
            })
    return results


def print_results(results: list[dict]) -> None:
    def f(v, fmt="{:.1f}"):
        return "-" if v in (None, "") else fmt.format(float(v))

    for i, r in enumerate(results, 1):
        print(f"\n[{i}] {r['request']}: {r['prompt_tokens']} prompt tokens -> "
              f"{r['completion_tokens']} tokens")
        print(f"    answer: {r['text']!r}")
        kv = "-" if not r["kv_bytes"] else f"{int(r['kv_bytes']) / 1024:.0f} KiB"
        timing = (f"TTFT {f(r['ttft_ms'])} ms | ITL {f(r['itl_ms'], '{:.2f}')} ms"
                  if "stream" in r["request"] else f"latency {f(r['total_ms'])} ms (whole answer)")
        print(f"    {timing} | KV moved {kv} | transfer {f(r['transfer_ms'], '{:.2f}')} ms | "
              f"mode {r['mode'] or 'disaggregated'}")


def main(args: argparse.Namespace) -> int:
    from kvbridge.demo import tiny_model

    model = args.model
    if model is None:
        path = tiny_model.default_path()
        if not path.exists():
            print(f"building the tiny model into {path} ...", flush=True)
        model = str(tiny_model.ensure(path))
    model_name = "tiny" if args.model is None else args.model
    log_dir = Path(args.log_dir or f"/tmp/kvbridge-up-{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack()
    rc = 0
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        router_url = start_stack(args, model, log_dir, stack)
        results = run_requests(router_url, model_name, args.max_tokens)
        print_results(results)
        (log_dir / "results.json").write_text(json.dumps(results, indent=2))
        if args.serve:
            print(f"\nserving on {router_url} - Ctrl-C to stop")
            while all(s.alive() for s in stack.servers):
                time.sleep(1)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted", flush=True)
        rc = 130
    except Exception as e:  # noqa: BLE001 - print, then clean up
        print(f"\nkvbridge up failed: {e}", file=sys.stderr)
        rc = 1
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        signal.signal(signal.SIGTERM, old)
        leftover = [s.name for s in stack.servers if s.alive()]
        busy = [p for p in stack.ports if not _port_free(p)]
        if leftover or busy:
            print(f"WARNING: still running {leftover}, ports still bound {busy}",
                  file=sys.stderr)
            rc = rc or 1
        else:
            print("all processes stopped, ports released" + (" (after Ctrl-C)"
                                                                if interrupted else ""))
    return rc
