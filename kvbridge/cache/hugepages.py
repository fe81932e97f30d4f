# SPDX-License-Identifier: Apache-2.0
"""Back an engine's host KV memory with transparent huge pages.

Why: a cross-process read (``process_vm_readv``, which both the cma transport
and UCX's shared-memory path use) pins the source and destination pages one
by one. Over 4 KiB pages that runs at about a third of a memcpy; over 2 MiB
pages it runs at memcpy speed. Measured on the 2-core test machine, 64 MiB in
128 scattered 512 KiB pieces, one thread: 6.8 GB/s over 4 KiB pages, 21.2 GB/s
over huge pages, memcpy 21.7.

NumPy asks for huge pages on its own large arrays; torch does not unless
``THP_MEM_ALLOC_ENABLE=1`` is in the process's environment when it starts -
so vLLM's CPU KV cache (``torch.zeros``) sits on 4 KiB pages. Its memory is
already written by the time a connector sees it, so advising alone
(``MADV_HUGEPAGE``) would only let ``khugepaged`` convert it over minutes;
``MADV_COLLAPSE`` (Linux 6.1+) converts it now, copying each 2 MiB piece once:
about 2.5 s per GiB of one core, next to nothing where the pages are huge
already. That runs on a background thread, in pieces, so an engine is never
held up: transfers work throughout and get faster as it goes.

The bytes never change; only the page size behind them. A page in use at
that moment (a peer reading it) or no free huge page is tried again with
back-off for up to ``RETRY_SECONDS``; where the kernel says no for good (THP
``never``, an older kernel) or the retries run out, the memory stays as it
was and the reason is logged once.

Modes (``TransportConfig.huge_pages``): ``collapse`` [default] advise and
convert; ``advise`` advise only (new and ``khugepaged``-scanned pages);
``off`` leave the memory alone.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time

log = logging.getLogger(__name__)

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
HUGE_PAGE = 2 << 20
#: one ``MADV_COLLAPSE`` call's span: short enough that closing the transport
#: stops the conversion within a few hundred ms
COLLAPSE_PIECE = 64 << 20
MODES = ("collapse", "advise", "off")
#: errnos after which a page is tried again later: EAGAIN - a page is in use
#: right now (a peer's ``process_vm_readv`` holds it for the length of one
#: read, so converting a cache that is being served meets this often);
#: ENOMEM - no free huge page right now (compaction may make one)
RETRY_ERRNOS = (errno.EAGAIN, errno.ENOMEM)
#: the wait before the first retry of busy pages [0.05 s]; it doubles each
#: round up to ``RETRY_MAX_DELAY`` [2 s]
RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 2.0
#: how long busy pages are retried before they are left on small pages and
#: the reason reported [60 s]
RETRY_SECONDS = 60.0

_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def aligned_span(addr: int, nbytes: int) -> tuple[int, int]:
    """The whole 2 MiB pages inside ``[addr, addr + nbytes)``: (start, length)."""
    lo = (addr + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    hi = (addr + nbytes) & ~(HUGE_PAGE - 1)
    return lo, max(0, hi - lo)


def thp_setting() -> str:
    """The kernel's transparent huge page setting: "always", "madvise",
    "never", or "absent" (no THP support)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0] if "[" in text else text.strip()


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(address, bytes) spans with overlapping or touching ones merged: an
    engine's regions often share one allocation (vLLM lays every layer of a
    block out in one buffer, so each layer's region spans nearly all of it)."""
    out: list[list[int]] = []
    for addr, n in sorted((a, n) for a, n in spans if n > 0):
        if out and addr <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], addr + n - out[-1][0])
        else:
            out.append([addr, n])
    return [(a, n) for a, n in out]


def _advise(addr: int, nbytes: int, advice: int) -> int:
    """madvise; 0 or the errno."""
    if _madvise(addr, nbytes, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


class HugePages:
    """Converts host regions to huge pages on a background thread.

    Args:
        spans: (address, bytes) of each region; only their whole 2 MiB pages
            are touched.
        mode: one of ``MODES``.
    """

    def __init__(self, spans: list[tuple[int, int]], mode: str = "collapse"):
        if mode not in MODES:
            raise ValueError(f"huge_pages must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.spans = [s for s in (aligned_span(a, n) for a, n in merge_spans(spans)) if s[1]]
        self.nbytes = sum(n for _, n in self.spans)
        #: set when the conversion is over (done, refused, stopped or not asked)
        self.done = threading.Event()
        #: bytes converted so far, and why it stopped early (None: it did not)
        self.collapsed = 0
        #: 2 MiB pages still busy after a page-by-page try, so retried later
        self.retried = 0
        self.error: str | None = None
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HugePages:
        if self.mode == "off" or not self.spans:
            self.done.set()
            return self
        for addr, n in self.spans:
            err = _advise(addr, n, MADV_HUGEPAGE)
            if err:
                self._give_up(f"MADV_HUGEPAGE: {os.strerror(err)}")
                return self
        if self.mode == "advise":
            self.done.set()
            return self
        self._thread = threading.Thread(target=self._collapse, name="kvb-hugepages",
                                        daemon=True)
        self._thread.start()
        return self

    def _collapse(self) -> None:
        t0 = time.perf_counter()
        try:
            busy: list[tuple[int, int]] = []  # 2 MiB pages the kernel said "not now" to
            for addr, n in self.spans:
                for off in range(0, n, COLLAPSE_PIECE):
                    if self._stop.is_set():
                        return
                    piece = min(COLLAPSE_PIECE, n - off)
                    err = self._collapse_span(addr + off, piece)
                    if err in RETRY_ERRNOS:
                        # The kernel went on past the page it could not take and
                        # converted the rest of the piece: retried page by page,
                        # a page that is huge already costs next to nothing.
                        busy += [(p, HUGE_PAGE) for p in range(addr + off, addr + off + piece,
                                                               HUGE_PAGE)]
                    elif err:
                        self._give_up(f"MADV_COLLAPSE: {os.strerror(err)}")
                        return
            # The first round runs at once; the later ones back off.
            delay, deadline, last_err = 0.0, time.monotonic() + RETRY_SECONDS, 0
            while busy:
                if delay and time.monotonic() + delay > deadline:
                    self._give_up(f"MADV_COLLAPSE: {os.strerror(last_err)}: "
                                  f"{len(busy) * HUGE_PAGE >> 20} MiB still busy after "
                                  f"{RETRY_SECONDS:g} s of retries")
                    return
                if self._stop.wait(delay):  # the transport is closing
                    return
                still = []
                for page, n in busy:
                    err = self._collapse_span(page, n)
                    if err in RETRY_ERRNOS:
                        still.append((page, n))
                        last_err = err
                    elif err:
                        self._give_up(f"MADV_COLLAPSE: {os.strerror(err)}")
                        return
                if not delay:
                    self.retried = len(still)
                busy = still
                delay = min(2 * delay, RETRY_MAX_DELAY) if delay else RETRY_FIRST_DELAY
            self.seconds = time.perf_counter() - t0
            if self.seconds > 0.5:
                log.info("KV memory on huge pages: %.2f GiB converted in %.1f s "
                         "(THP_MEM_ALLOC_ENABLE=1 in the engine's environment makes torch "
                         "allocate it so, with nothing to convert)",
                         self.collapsed / (1 << 30), self.seconds)
        finally:
            self.done.set()

    def _collapse_span(self, addr: int, nbytes: int) -> int:
        """One ``MADV_COLLAPSE`` (run without the GIL: ctypes releases it);
        counts the bytes when it worked. 0 or the errno."""
        err = _advise(addr, nbytes, MADV_COLLAPSE)
        if not err:
            self.collapsed += nbytes
        return err

    def _give_up(self, why: str) -> None:
        self.error = why
        log.info("KV memory stays on its current pages (%s); cross-process reads of it "
                 "run slower", why)
        self.done.set()

    def status(self) -> dict:
        """For metrics: the mode, bytes to convert, bytes converted, whether
        it is over, how long it took, and why it stopped early (if it did)."""
        return {"mode": self.mode, "bytes": self.nbytes, "converted": self.collapsed,
                "retried": self.retried,
                "done": self.done.is_set(), "seconds": round(self.seconds, 3),
                "error": self.error}

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the conversion to be over; whether it is."""
        return self.done.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


def host_spans(cache) -> list[tuple[int, int]]:
    """(address, bytes) of a host cache's regions; none for device memory or
    page-locked memory (its pages are pinned where they are)."""
    if cache.device.type != "cpu":
        return []
    try:
        if any(v.is_pinned() for v in cache.byte_views):
            return []
    except RuntimeError:  # no CUDA runtime to ask: nothing is pinned
        pass
    return [(addr, nbytes) for addr, _stride, nbytes in cache.region_addresses()]
