# SPDX-License-Identifier: Apache-2.0
"""pd_compare: tune the NIXL agents vLLM's NixlConnector creates.

run.py puts this directory on PYTHONPATH of the vLLM NixlConnector servers
(only those) unless ``--nixl-progress-thread stock`` is given. vLLM creates its
NIXL agent with a progress thread (NIXL's default) and NIXL's Python wrapper
hard-codes that thread's poll delay to 0 (``pthrDelay = 0``): it busy-polls
UCX and takes a whole core per instance even when idle. On a two-core machine
the prefill and decode instances' two spinning threads starve the engines
(measured: 2k-token TTFT 30x the colocated one). Without any progress thread
(``enable_prog_thread=False``) UCX transfers over ``self,sm,tcp`` stall until
the target's engine happens to step (measured: 8-44 s per transfer), so neither
extreme is a fair baseline.

Environment (read in each process):

* ``PD_COMPARE_NIXL_PTHR_DELAY_US=N``: keep the progress thread but let it
  wait N microseconds between polls (idle CPU goes from ~100 % to ~2 %).
* ``PD_COMPARE_NIXL_PROG_THREAD=0``: no progress thread at all.
* ``PD_COMPARE_NIXL_KEEP_AFFINITY=1``: ignore the ``os.sched_setaffinity(0,
  [last core of each NUMA node])`` call vLLM's NixlConnector worker makes on
  the CPU platform ("reserve a core for KV transfer"). It runs in the worker's
  main thread - the thread that also runs the model as OpenMP thread 0 - so
  with ``VLLM_CPU_OMP_THREADS_BIND=0`` the prefill instance's forward pass
  moves to core 1, the decode instance's core (measured: the prefill worker's
  busiest thread allowed only on CPU 1).

Nothing is imported here: a meta-path hook patches NIXL's ``_api`` module
(``nixl_cu12._api`` etc., which ``nixl`` re-exports as ``nixl._api``) when, and
if, the process imports it.
"""

import importlib.abc
import importlib.util
import os
import sys

#: Where ``nixl_agent`` really lives (``nixl/__init__`` injects one of the
#: platform builds as ``nixl._api``).
_MODULES = {"nixl._api", "nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api"}
_DELAY = os.environ.get("PD_COMPARE_NIXL_PTHR_DELAY_US")
_NO_THREAD = os.environ.get("PD_COMPARE_NIXL_PROG_THREAD") == "0"
_KEEP_AFFINITY = os.environ.get("PD_COMPARE_NIXL_KEEP_AFFINITY") == "1"
_NIXL_WORKER = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"


class _Bindings:
    """Forwards to NIXL's pybind module; sets the progress-thread knobs on the
    agent config right before the agent is built."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def nixlAgent(self, name, cfg):  # noqa: N802 - NIXL's name
        if _NO_THREAD:
            cfg.useProgThread = False
        elif _DELAY is not None and cfg.useProgThread:
            cfg.pthrDelay = int(_DELAY)
        return self._real.nixlAgent(name, cfg)


def _patch(module) -> None:
    binds = getattr(module, "nixlBind", None)
    if binds is None or isinstance(binds, _Bindings):
        return
    module.nixlBind = _Bindings(binds)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _MODULES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        orig_exec = spec.loader.exec_module

        def exec_module(module):
            orig_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _DELAY is not None or _NO_THREAD:
    sys.meta_path.insert(0, _Hook())

if _KEEP_AFFINITY and hasattr(os, "sched_setaffinity"):
    _orig_setaffinity = os.sched_setaffinity

    def _sched_setaffinity(pid, mask):
        if pid == 0 and sys._getframe(1).f_globals.get("__name__") == _NIXL_WORKER:
            print(f"pd_compare nixl_tuning: kept this thread's CPU affinity "
                  f"{sorted(os.sched_getaffinity(0))} (NixlConnector asked for {sorted(mask)})",
                  file=sys.stderr, flush=True)
            return None
        return _orig_setaffinity(pid, mask)

    os.sched_setaffinity = _sched_setaffinity
