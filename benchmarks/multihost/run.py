# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench transport`` between two "hosts": network namespaces on
this machine joined by veth pairs and a bridge (``kvbridge.bench.netns``).

The far host runs ``kvbridge bench transport --listen``, the near one
``--connect``: kvbridge's tcp transport, kvbridge's nixl transport over UCX's
TCP transport (``UCX_TLS=tcp``: UCX would otherwise notice that both
namespaces share one machine and use shared memory), a raw socket and raw
NIXL, all over the same veth link, in one run. Then once more with
``tc netem`` delay on both ends, where netem is available.

    sudo python benchmarks/multihost/run.py [--quick] [--delay 1ms]

Results: ``benchmarks/results/transport-remote[-quick][-netem].{md,json,png}``.
Needs root (namespaces) and iproute2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KVBRIDGE = str(Path(sys.executable).parent / "kvbridge")


def bench(far, near, port: int, extra: list[str], env: dict) -> int:
    log_path = Path(f"/tmp/kvbridge-multihost-listen-{port}.log")
    with open(log_path, "w") as log:
        listener = subprocess.Popen(far.cmd(KVBRIDGE, "bench", "transport", "--listen",
                                            f"{far.address}:{port}"),
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "serving helpers" not in log_path.read_text():
                if listener.poll() is not None or time.monotonic() > deadline:
                    print(log_path.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.2)
            return subprocess.run(
                near.cmd(KVBRIDGE, "bench", "transport", "--connect", f"{far.address}:{port}",
                         "--backends", "tcp,nixl", "--baselines", *extra), env=env).returncode
        finally:
            listener.terminate()
            listener.wait(20)


def main() -> int:
    from kvbridge.bench import netns

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="64 KiB, 1 MiB and 64 MiB only")
    p.add_argument("--delay", default="1ms", help="netem delay of the second run [1ms]")
    p.add_argument("--reps", default="5")
    args = p.parse_args()
    why = netns.available()
    if why:
        print(f"cannot make hosts here: {why}", file=sys.stderr)
        return 2
    env = {**os.environ, "UCX_TLS": "tcp", "KVBRIDGE_RESULTS_DIR": str(ROOT / "benchmarks" /
                                                                        "results")}
    extra = ["--reps", args.reps] + (["--quick"] if args.quick else [])
    with netns.Hosts(2) as (far, near):
        env["UCX_NET_DEVICES"] = far.device  # eth0 on both hosts
        print(f"far host {far.name} {far.address}, near host {near.name} {near.address}",
              file=sys.stderr)
        rc = bench(far, near, 47300, extra, env)
        netem_why = netns.netem_available()
        if netem_why:
            print(f"skipping the run with delay: {netem_why}", file=sys.stderr)
            return rc
        # The bench names its files transport-remote[-quick]: keep the first
        # run's under that name, the delayed run's with -netem appended.
        results = ROOT / "benchmarks" / "results"
        name = "transport-remote" + ("-quick" if args.quick else "")
        saved = {f: f.read_bytes() for f in results.glob(f"{name}.*")}
        for host in (far, near):
            host.netem("delay", args.delay)
        rc |= bench(far, near, 47301, extra, env)
        for f in results.glob(f"{name}.*"):
            f.rename(f.with_name(f"{name}-netem{f.suffix}"))
        for f, data in saved.items():
            f.write_bytes(data)
    return rc


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
