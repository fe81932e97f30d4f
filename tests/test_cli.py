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
    # Where each pull's time went: every stage, producer's share included (same host).
    for r in rows:
        if r["backend"] in ("tcp", "cma"):
            st = r["stages_us"]
            assert set(st) == {"submit", "ask", "grant", "bytes", "verify", "finish", "wake",
                               "producer"}, st
            assert st["bytes"] > 0 and st["producer"] > 0
            # The stages tile the pull: their medians add up to about its median.
            assert 0.5 < sum(v for k, v in st.items() if k != "producer") / r["latency_us"] < 2
    assert "where a pull's time goes" in proc.stdout
    assert all(r["spread"] is None or r["spread"] >= 0 for r in rows)
    assert "too noisy to judge" in proc.stdout  # 2 repetitions cannot be judged


def test_bench_repeats_a_noisy_measurement_longer_and_flags_it():
    from kvbridge.bench.transport.plan import Timing
    from kvbridge.bench.transport.procs import repeat, spread

    assert spread([1.0, 1.0, 1.0, 1.0]) == 0.0
    assert spread([1.0, 1.0, 1.0]) is None
    steady = iter(lambda: 0.001, None)
    assert len(repeat(lambda: next(steady), Timing(5, 0.0, settle_time=1.0))) == 5
    flip = iter(range(10 ** 6))
    noisy = repeat(lambda: (1.0, 3.0)[next(flip) % 2] * 1e-3, Timing(5, 0.0, settle_time=0.2))
    assert len(noisy) > 50 and spread(noisy) > 0.25  # kept going for 0.2 s, still noisy
    capped = repeat(lambda: (1.0, 3.0)[next(flip) % 2] * 1e-3,
                    Timing(5, 0.0, max_reps=20, settle_time=10.0))
    assert len(capped) == 20


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
