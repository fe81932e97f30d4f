# SPDX-License-Identifier: Apache-2.0
"""One configuration's processes: its vLLM servers and (P/D) the kvbridge
proxy, started, health-waited and stopped through ``kvbridge.serve.launch``."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.pd_compare.plan import SERVER_ARGS, SERVER_ENV, Config, nixl_tuning_env
from kvbridge.serve.launch import (
    VllmServer,
    free_port,
    kv_transfer_config,
    start_server,
    stop_all,
    stop_group,
    wait_healthy,
    wait_http_healthy,
)

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)



@dataclass
class Stack:
    cfg: Config
    servers: list[VllmServer] = field(default_factory=list)
    proxy: subprocess.Popen | None = None
    proxy_url: str | None = None
    proxy_log: Path | None = None
    #: the proxy's ``--request-log``: one JSON line per request (its hop)
    proxy_requests: Path | None = None

    @property
    def endpoint(self) -> str:
        return self.proxy_url or self.servers[0].url

    def server(self, name: str) -> VllmServer | None:
        return next((s for s in self.servers if s.name.startswith(name)), None)

    def stop(self) -> None:
        stop_group(self.proxy)
        stop_all(self.servers)

    def leftovers(self) -> list[str]:
        left = [s.name for s in self.servers if s.alive()]
        if self.proxy is not None and self.proxy.poll() is None:
            left.append("proxy")
        return left


def start_stack(cfg: Config, model: str, args, log_dir: Path) -> Stack:
    st = Stack(cfg)
    common = dict(block_size=args.block_size, served_name="tiny", log_dir=log_dir,
                  extra_args=SERVER_ARGS, max_model_len=4096)
    if cfg.kind == "colocated":
        st.servers.append(start_server(
            f"{cfg.key}", model, free_port(),
            env={**SERVER_ENV, "VLLM_CPU_OMP_THREADS_BIND": args.colocated_cores}, **common))
    else:
        for role, core, name in (("kv_producer", args.prefill_core, "prefill"),
                                 ("kv_consumer", args.decode_core, "decode")):
            env = {**SERVER_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(core)}
            if cfg.kind == "nixl":
                kv = {"kv_connector": "NixlPushConnector" if cfg.kv_mode == "stream"
                      else "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
                env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
                env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())
                env.update(nixl_tuning_env(args))
            else:
                kv = kv_transfer_config(role, transport=cfg.transport, kv_port=free_port(),
                                        extra=args.kvbridge_extra)
            opts = dict(common)
            if cfg.kv_mode == "stream" and cfg.kind == "kvbridge" and name == "prefill":
                # Chunked prefill: each chunk's blocks are read while the next computes.
                opts["extra_args"] = SERVER_ARGS + ["--max-num-batched-tokens",
                                                    str(args.stream_chunk_tokens)]
            st.servers.append(start_server(f"{name}-{cfg.key}", model, free_port(),
                                           kv_config=kv, env=env, **opts))
    return st


def wait_servers(st: Stack, timeout_s: float) -> None:
    """``wait_healthy`` on the stack's servers, logging each one that turns
    healthy and, every 10 s, the ones still starting."""
    wait_healthy(
        st.servers, timeout_s,
        progress=lambda s, el: log(f"  {s.name} healthy after {el:.0f} s ({s.url})"),
        waiting=lambda pending, el: log(
            f"  waiting for {', '.join(s.name for s in pending)} ({el:.0f} s)"))


def start_proxy(st: Stack, log_dir: Path) -> None:

    port = free_port()
    exe = Path(sys.executable).parent / "kvbridge"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else
           ["-m", "kvbridge.cli"]), "proxy", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--kv-mode", st.cfg.kv_mode]
    for s in st.servers:
        cmd += ["--prefill" if s.name.startswith("prefill") else "--decode", s.url]
    st.proxy_log = log_dir / f"proxy-{st.cfg.key}-{port}.log"
    st.proxy_requests = log_dir / f"proxy-{st.cfg.key}-{port}-requests.jsonl"
    cmd += ["--request-log", str(st.proxy_requests)]
    with open(st.proxy_log, "wb") as f:
        st.proxy = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, stdin=subprocess.DEVNULL)
    st.proxy_url = f"http://127.0.0.1:{port}"
    wait_http_healthy(st.proxy, st.proxy_url, 90, st.proxy_log)


def affinity(server: VllmServer) -> dict[str, dict[str, int]]:
    """Per process of the server's group: thread count by allowed-CPU list, and
    which list the busiest thread has (where the compute actually ran)."""
    out: dict[str, dict] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != server.proc.pid:  # pgrp
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            lists: dict[str, int] = {}
            busiest, busy_t = None, -1
            for t in (p / "task").iterdir():
                st = (t / "status").read_text()
                m = re.search(r"Cpus_allowed_list:\s*(\S+)", st)
                cl = m.group(1) if m else "?"
                lists[cl] = lists.get(cl, 0) + 1
                ts = (t / "stat").read_text()
                tf = ts[ts.rindex(")") + 2:].split()
                cpu_t = int(tf[11]) + int(tf[12])
                if cpu_t > busy_t:
                    busiest, busy_t = cl, cpu_t
            out[f"{comm}[{p.name}]"] = {"threads_by_cpus": lists, "busiest_thread_cpus": busiest}
        except (OSError, ValueError, IndexError):
            continue
    return out

