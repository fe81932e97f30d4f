# SPDX-License-Identifier: Apache-2.0
"""Export in one process, import in another, bytes over a real TCP socket."""

import random

from kvbridge.demo.blocks import run_pair


def test_round_trip_between_two_processes():
    rng = random.Random(7)
    total = 48
    src = rng.sample(range(total), 20)
    dst = rng.sample(range(total), 20)
    report = run_pair(src, dst, total, seed=5)
    assert report["producer_exitcode"] == 0
    assert report["digest_ok"], "imported bytes differ from the exported blocks"
    assert report["other_blocks_untouched"], "a block outside the selection changed"
    assert report["bytes"] == 20 * 2 * 2 * 128 * 128 * 2
