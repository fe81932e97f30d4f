# SPDX-License-Identifier: Apache-2.0
"""A producer in a PID namespace of its own (run under ``unshare --pid
--fork``): what a container on the same host looks like to ``cma``.

argv: BACKEND SEED. Prints its address, then for each request id read from
stdin publishes blocks 0..3 and prints "ok"; exits at EOF."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.transport_peer import make_cache  # noqa: E402
from kvbridge.transport import TransportConfig, create_transport  # noqa: E402


def main() -> None:
    backend, seed = sys.argv[1], int(sys.argv[2])
    with create_transport(backend, make_cache(16, seed), TransportConfig()) as t:
        print(t.serve(), flush=True)
        for line in sys.stdin:
            t.publish(line.strip(), [0, 1, 2, 3])
            print("ok", flush=True)


if __name__ == "__main__":
    main()
