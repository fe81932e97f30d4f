# SPDX-License-Identifier: Apache-2.0
"""A transport's host KV memory goes over to huge pages (``huge_pages``),
bytes unchanged; ``off`` leaves it alone; bad modes are refused.

Each case runs in a fresh process without ``THP_MEM_ALLOC_ENABLE``, so torch
allocates the cache on 4 KiB pages, as vLLM's is unless its environment says
otherwise - the memory the background conversion exists for."""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbridge.cache import hugepages
from kvbridge.transport import TransportConfig

ROOT = Path(__file__).resolve().parents[1]
MADV_NOHUGEPAGE = 15

SCRIPT = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[2] + "/tests")
from helpers.transport_peer import make_cache
from kvbridge.transport import TransportConfig, create_transport

def huge_kib(addr, nbytes):
    # AnonHugePages of the mappings overlapping [addr, addr + nbytes) (madvise
    # splits a mapping where an advised span starts and ends)
    inside, total = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < addr + nbytes and addr < hi
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total

# 48 blocks of 1 MiB in two 24 MiB regions (layers)
cache = make_cache(48, seed=7, block_size=128, kv_heads=8, head_size=128, layers=2)
views = cache.byte_views
kib = lambda: sum(huge_kib(v.data_ptr(), v.numel()) for v in views)
digest = lambda: [hashlib.sha256(v.numpy()).hexdigest() for v in views]
before, kib_before = digest(), kib()
t = create_transport("tcp", cache, TransportConfig(huge_pages=sys.argv[1]))
done = t.huge_pages.wait(120)
print(json.dumps(dict(done=done, before=kib_before, after=kib(),
                      same=digest() == before, collapsed=t.huge_pages.collapsed,
                      nbytes=t.huge_pages.nbytes, error=t.huge_pages.error)))
t.close()
"""


def run_case(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(ROOT)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_collapse_moves_the_written_cache_onto_huge_pages_bytes_unchanged():
    res = run_case("collapse")
    assert res["done"] and res["same"], res
    if hugepages.thp_setting() == "madvise":  # (under "always" the kernel may have given huge ones)
        assert res["before"] == 0, res  # torch's own pages: 4 KiB
    if hugepages.thp_setting() in ("always", "madvise"):
        assert res["error"] is None, res
        assert res["collapsed"] == res["nbytes"] >= 40 << 20, res
        assert res["after"] >= 40 << 10, res  # KiB
    else:  # the kernel says no: reported, and nothing else changes
        assert res["error"], res


def test_off_leaves_the_cache_alone():
    res = run_case("off")
    assert res["done"] and res["same"], res
    assert res["before"] == res["after"] and res["collapsed"] == 0, res


def test_a_mode_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="huge_pages must be one of collapse, advise, off"):
        hugepages.HugePages([], "always")
    assert TransportConfig().huge_pages == "collapse"


def test_aligned_span_keeps_only_whole_huge_pages():
    page = hugepages.HUGE_PAGE
    assert hugepages.aligned_span(page + 1, 3 * page) == (2 * page, 2 * page)
    assert hugepages.aligned_span(page, page - 1) == (page, 0)


def test_regions_sharing_one_allocation_are_converted_once():
    """vLLM's layers interleave in one buffer: each layer's region spans nearly
    all of it. The spans merge, so the memory is advised and counted once."""
    page = hugepages.HUGE_PAGE
    base = 100 * page
    layers = [(base + i * 4096, 64 * page) for i in range(32)]
    hp = hugepages.HugePages(layers + [(base + 200 * page, page), (0, 0)], "off")
    assert hp.spans == [(base, 64 * page), (base + 200 * page, page)]
    assert hp.nbytes == 65 * page


class PageHolder:
    """Keeps the kernel holding one 4 KiB page, as it does for the length of
    each of a peer's ``process_vm_readv`` reads: ``vmsplice`` puts a
    reference to the page in a pipe and it stays there until the pipe is read.
    (A real reader loop holds the page only most of the time, so the kernel
    sometimes converts it between two reads: right, but not a test.)"""

    class _IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    def __init__(self, addr: int):
        self._read_end, self._write_end = os.pipe()
        iov = self._IoVec(addr, 4096)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.vmsplice(self._write_end, ctypes.byref(iov), 1, 0) == 4096, \
            os.strerror(ctypes.get_errno())

    def release(self) -> None:
        if self._read_end >= 0:
            assert len(os.read(self._read_end, 4096)) == 4096
            os.close(self._read_end)
            os.close(self._write_end)
            self._read_end = -1

    def __enter__(self) -> PageHolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@pytest.fixture
def small_page_memory():
    """32 MiB of written anonymous memory on 4 KiB pages, 2 MiB aligned:
    (address, bytes)."""
    size = 32 << 20
    buf = mmap.mmap(-1, size + hugepages.HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    addr, _ = hugepages.aligned_span(base, size + hugepages.HUGE_PAGE)
    assert hugepages._advise(addr, size, MADV_NOHUGEPAGE) == 0
    ctypes.memset(addr, 7, size)
    yield addr, size
    del base
    gc.collect()
    buf.close()


needs_thp = pytest.mark.skipif(hugepages.thp_setting() not in ("always", "madvise"),
                               reason="this kernel gives no transparent huge pages")


@needs_thp
def test_a_page_a_peer_is_reading_is_converted_once_the_read_is_over(small_page_memory):
    """CI once failed so: a peer's read held a page of the KV cache while it
    was being converted, the kernel said EAGAIN, and the conversion gave up
    with half the cache on small pages. A busy page is now tried again until
    it is free, and nothing else waits for it."""
    addr, size = small_page_memory
    with PageHolder(addr + 5 * hugepages.HUGE_PAGE + 8192) as held:
        hp = hugepages.HugePages([(addr, size)]).start()
        time.sleep(0.5)
        st = hp.status()  # the rest is converted; the held page waits
        assert not st["done"] and st["converted"] == size - hugepages.HUGE_PAGE, st
        held.release()
        assert hp.wait(30), hp.status()
    st = hp.status()
    assert st["error"] is None and st["converted"] == st["bytes"] == size, st
    assert st["retried"] >= 1, st


@needs_thp
def test_a_page_that_stays_busy_is_left_small_and_the_reason_reported(small_page_memory,
                                                                      monkeypatch):
    addr, size = small_page_memory
    monkeypatch.setattr(hugepages, "RETRY_SECONDS", 0.5)
    with PageHolder(addr + 5 * hugepages.HUGE_PAGE):
        hp = hugepages.HugePages([(addr, size)]).start()
        assert hp.wait(30), hp.status()
    st = hp.status()
    assert st["converted"] == size - hugepages.HUGE_PAGE, st
    assert st["error"] == ("MADV_COLLAPSE: Resource temporarily unavailable: 2 MiB still "
                           "busy after 0.5 s of retries"), st


@needs_thp
def test_closing_while_a_page_waits_stops_at_once_without_blaming_the_page(small_page_memory):
    addr, size = small_page_memory
    with PageHolder(addr + 5 * hugepages.HUGE_PAGE):
        hp = hugepages.HugePages([(addr, size)]).start()
        time.sleep(0.3)  # the rest converted, the held page waiting for its retry
        t0 = time.monotonic()
        hp.stop()
        assert time.monotonic() - t0 < 1.0 and hp.done.is_set(), hp.status()
    st = hp.status()
    assert st["converted"] == size - hugepages.HUGE_PAGE and st["error"] is None, st
