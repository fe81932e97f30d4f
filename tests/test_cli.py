# SPDX-License-Identifier: Apache-2.0
"""The installed ``kvbridge`` command, run as a user would."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

KVBRIDGE = shutil.which("kvbridge", path=str(Path(sys.executable).parent)) or "kvbridge"


def run(*args, **kw):
    return subprocess.run([KVBRIDGE, *args], capture_output=True, text=True, timeout=300, **kw)


def test_info_json_reports_kernels_and_versions():
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["copy_path"] in ("cpu_kernel", "torch")
    assert isinstance(info["cpu_kernel"], bool) and isinstance(info["cuda_available"], bool)
    assert info["torch"].startswith("2.13.0")
    assert info["vllm"] == "0.32.0"
    import torch

    assert info["gpu_copy_path"] == ("cuda_kernel" if torch.cuda.is_available() else None)


def test_bench_blocks_quick_writes_verified_results(tmp_path):
    out = tmp_path / "blocks.json"
    proc = run("bench", "blocks", "--quick", "--json", str(out),
               env={**__import__("os").environ, "KVBRIDGE_RESULTS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["command"].startswith("kvbridge bench blocks --quick")
    rows = data["results"]
    assert {r["blocks"] for r in rows} == {1, 16, 128}
    assert all(r["verified"] for r in rows)
    assert all(r["memcpy_gbps"] > 0 for r in rows)
    assert "memcpy GB/s" in proc.stdout
    assert (tmp_path / "blocks-quick.md").exists()


def test_demo_blocks_moves_and_verifies(tiny_model_dir):
    proc = run("demo-blocks", "--blocks", "16", "--model", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every byte matches: True; other blocks untouched: True" in proc.stdout
    assert "moved 16 blocks" in proc.stdout


def test_bad_subcommand_is_a_usage_error():
    proc = run("bench", "nonsense")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_bench_transport_small_run_verifies_every_byte(tmp_path):
    out = tmp_path / "t.json"
    proc = run("bench", "transport", "--backends", "tcp,cma", "--sizes", "64K,1M", "--reps", "2",
               "--baselines", "--json", str(out),
               env={**__import__("os").environ, "KVBRIDGE_RESULTS_DIR": str(tmp_path),
                    "UCX_NET_DEVICES": "lo"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    backends = {r["backend"] for r in rows}
    assert {"tcp", "cma", "memcpy", "socket"} <= backends
    assert all(r["verified"] for r in rows if r["backend"] in ("tcp", "cma"))
    assert all(r["gbps"] > 0 and r["latency_us"] > 0 for r in rows)
    assert all(r["handshake_ms"] > 0 for r in rows if r["backend"] in ("tcp", "cma"))
    assert "handshake (connect, authenticate, compare layouts" in proc.stdout


def test_help_imports_no_subcommand_module():
    """``kvbridge --help`` lists every subcommand without importing the proxy,
    the benchmarks, torch or vLLM; a subcommand's --help builds its arguments."""
    probe = ("import sys\nfrom kvbridge import cli\n"
             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('kvbridge', 'torch', 'httpx', 'vllm', 'fastapi', 'msgspec', 'numpy')))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout and "proxy" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "['kvbridge', 'kvbridge.cli']"
    proc = run("bench", "transport", "--help")
    assert proc.returncode == 0 and "--baselines" in proc.stdout
    proc = run("proxy", "--help")
    assert proc.returncode == 0 and "--prefill" in proc.stdout
