# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench chaos --fuzz``: malformed input against a real producer, as a figure.

Why: a producer's control listener faces whatever can reach its port. Its
contract (``kvbridge.protocol``) is that any bad input gets an ``Error`` frame
or a closed connection - for that connection only - and that nothing about the
producer is said before the consumer's MAC verifies. This benchmark measures
that contract instead of assuming it.

For each transport a real producer runs in its own process: a real
``Transport`` over a real ``PagedKVCache``, a shared secret configured, two
requests published (a target the fuzzer never touches, a decoy it may be
granted). This process then sends N inputs from a seeded RNG
(``kvbridge.bench.fuzz_cases``), each on its own fresh TCP connection, shuts
the write side and judges the reply within a deadline
(``kvbridge.bench.fuzz_wire``): ``error:<code>``, ``pull:<code>``, ``grant``,
``closed``, or ``hung`` (a failure). Every input also names the replies a
correct producer may give; any other is ``unexpected``.

After the inputs: the producer process must be alive (a death is a ``crash``;
the producer is restarted and the run goes on), its threads and open fds must
be back at their level before the inputs (else ``leaked``), no thread of it may
have died of an unhandled exception, and a real consumer
(``Transport.pull``) must still pull the target request byte-exact
(``still serving``).

Results: ``benchmarks/results/chaos-fuzz[-quick].{json,md}``. Replay single
inputs with ``--only 17,42`` (same ``--seed``): they are printed, not written.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from kvbridge.bench.common import Progress, table, write_results
from kvbridge.bench.fuzz_cases import CLASSES, Target, make_case
from kvbridge.bench.fuzz_wire import Outcome, run_case

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

SEED = 1234
FULL_INPUTS, QUICK_INPUTS = 10000, 500
DEADLINE_S = 2.0
#: block shape of ``kvbridge.bench.transport`` (1 KiB layer-blocks): small and fast
SHAPE, NUM_BLOCKS = "small", 32
TARGET, TARGET_BLOCKS = "fuzz-still-serving-target", (3, 17, 5, 9)
DECOY, DECOY_BLOCKS = "decoy", (1, 2, 30)
WARMUP, WARMUP_BLOCKS = "fuzz-warmup", (7, 8)
#: long enough that no lease ends during a run
LEASE_S = 24 * 3600.0
START_TIMEOUT_S = 120.0
#: failure examples kept per transport in the results
EXAMPLES = 20


# -- the producer process -----------------------------------------------------------

def _producer_main(pipe: Connection, backend: str, secret: bytes) -> None:
    """A kvbridge producer. Startup replies ``("ok", {address, layout})``; then
    ``("stats",)``, ``("digest", ids)`` and ``("stop",)``."""
    errors: list[str] = []
    levels: Counter = Counter()

    def excepthook(a: threading.ExceptHookArgs) -> None:
        # An exception no handler caught killed a thread: a server bug.
        # "tcp-conn-50412" -> "conn": the same bug reads the same on every backend
        kind = "-".join(p for p in a.thread.name.split("-")[1:] if not p.isdigit()) \
            if a.thread else "?"
        errors.append(f"{a.exc_type.__name__}: {str(a.exc_value)[:200]} (thread {kind})")

    class _Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            levels[record.levelname] += 1

    threading.excepthook = excepthook
    log = logging.getLogger("kvbridge")
    log.addHandler(_Count())  # counted, not printed: a fuzz run logs thousands
    log.propagate = False
    transport = None
    try:
        from kvbridge.bench.transport import cache_digest, make_cache
        from kvbridge.transport import TransportConfig, create_transport

        cache = make_cache(SHAPE, NUM_BLOCKS, SEED)
        transport = create_transport(backend, cache, TransportConfig(secret=secret.decode(),
                                                                     lease_s=LEASE_S))
        address = transport.serve()
        for rid, ids in ((TARGET, TARGET_BLOCKS), (DECOY, DECOY_BLOCKS), (WARMUP, WARMUP_BLOCKS)):
            transport.publish(rid, list(ids))
        pipe.send(("ok", {"address": address, "layout": cache.layout}))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        pipe.send(("error", f"{backend} producer failed to start: {type(e).__name__}: {e}"))
        if transport is not None:
            transport.close()
        return
    try:
        while True:
            cmd, *args = pipe.recv()
            if cmd == "stats":
                pipe.send(("ok", {"threads": threading.active_count(),
                                  "fds": len(os.listdir("/proc/self/fd")),
                                  "thread_exceptions": list(errors), "log": dict(levels),
                                  "metrics": transport.metrics()}))
            elif cmd == "digest":
                pipe.send(("ok", cache_digest(cache, args[0])))
            elif cmd == "stop":
                pipe.send(("ok", None))
                return
    except (EOFError, OSError):
        pass  # the parent went away
    finally:
        transport.close()


class Producer:
    """A producer process and its pipe (spawned: no state inherited)."""

    def __init__(self, backend: str, secret: bytes):
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_producer_main, args=(child, backend, secret),
                                daemon=True, name=f"kvbridge-fuzz-{backend}-producer")
        self.proc.start()
        child.close()
        info = self._reply(START_TIMEOUT_S)
        self.address, self.layout = info["address"], info["layout"]

    def _reply(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not self.pipe.poll(0.05):
            if not self.proc.is_alive():
                raise RuntimeError(f"producer exited (code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"producer did not answer in {timeout:.0f} s")
        status, value = self.pipe.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, *cmd: Any, timeout: float = 30.0) -> Any:
        self.pipe.send(cmd)
        return self._reply(timeout)

    def alive(self) -> bool:
        return self.proc.is_alive()

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("stop", timeout=10)
        except (RuntimeError, TimeoutError, EOFError, OSError):
            pass
        self.pipe.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def secret_for(seed: int) -> bytes:
    return hashlib.sha256(f"kvbridge-fuzz-secret:{seed}".encode()).hexdigest().encode()


def make_target(backend: str, prod: Producer, secret: bytes, consumer) -> Target:
    # Handshake.info as this backend's real consumer sends it (cma checks it).
    return Target(backend, prod.layout, secret, consumer._client_info(), DECOY,
                  DECOY_BLOCKS, NUM_BLOCKS)


def make_consumer(backend: str, secret: bytes):
    from kvbridge.bench.transport import make_cache
    from kvbridge.transport import TransportConfig, create_transport

    return create_transport(backend, make_cache(SHAPE, NUM_BLOCKS, None),
                            TransportConfig(secret=secret.decode()))


def pull_verified(consumer, prod: Producer, rid: str, ids: tuple[int, ...]) -> str | None:
    """A real pull of ``rid`` into other local blocks; None if byte-exact, else why not."""
    from kvbridge.bench.transport import cache_digest
    from kvbridge.transport import TransferState

    local = [NUM_BLOCKS - 1 - b for b in ids]
    handle = consumer.pull(prod.address, rid, list(ids), local)
    if handle.wait(30) != TransferState.DONE:
        return f"pull {handle.state.value}: {handle.error}"
    if cache_digest(consumer.cache, local) != prod.call("digest", list(ids)):
        return "pulled bytes differ from the producer's"
    return None


def settle(prod: Producer, base: dict, wait_s: float = 10.0) -> dict:
    """Stats once threads and fds are back to ``base`` (or ``wait_s`` passed):
    connection threads end a moment after their socket closes."""
    deadline = time.monotonic() + wait_s
    while True:
        st = prod.call("stats")
        if (st["threads"] <= base["threads"] and st["fds"] <= base["fds"]) \
                or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def _example(seed: int, index: int, case, out, backend: str) -> dict:
    return {"index": index, "class": case.cls, "variant": case.variant,
            "expected": sorted(case.expect), "got": out.label, "codes": out.codes,
            "note": out.note, "payload_hex": case.payload[:256].hex(),
            "payload_bytes": len(case.payload),
            "replay": f"python -m kvbridge.bench.fuzz --transports {backend} --seed {seed} "
                      f"--only {index}"}


# -- one transport ---------------------------------------------------------------------

def new_result(backend: str, inputs: int) -> dict:
    return {"transport": backend, "inputs": inputs, "outcomes": Counter(),
            "by_class": {c: Counter() for c in CLASSES}, "by_variant": {}, "unexpected": 0,
            "unexpected_by_variant": Counter(), "first_unexpected": {}, "examples": [],
            "crashes": [], "hung": 0, "resets": 0, "refused": 0, "thread_exceptions": [],
            "still_serving": False, "still_serving_error": None, "leaked_threads": None,
            "leaked_fds": None, "elapsed_s": 0.0, "inputs_per_s": 0.0, "error": None}


def fuzz_backend(backend: str, indices: list[int], seed: int, deadline_s: float,
                 prog: Progress, verbose: bool = False) -> dict:
    """Send inputs ``indices`` to a fresh producer of ``backend``; the figures."""
    secret = secret_for(seed)
    res = new_result(backend, len(indices))
    prod = Producer(backend, secret)
    consumer = make_consumer(backend, secret)
    try:
        target = make_target(backend, prod, secret, consumer)
        # Warm-up: the consumer's connection stays open through the run, so the
        # baseline counts it; the pull also proves the set-up works at all.
        err = pull_verified(consumer, prod, WARMUP, WARMUP_BLOCKS)
        if err:
            raise RuntimeError(f"{backend}: the warm-up pull failed: {err}")
        base = settle(prod, {"threads": 0, "fds": 0}, wait_s=0.5)
        res["threads_before"], res["fds_before"] = base["threads"], base["fds"]
        t0 = time.perf_counter()
        for n, i in enumerate(indices):
            case = make_case(seed, i, target)
            try:
                out = run_case(prod.address, case, target, deadline_s)
            except OSError as e:  # connect refused or reset: the listener is gone
                out = Outcome("refused", note=str(e))
                res["refused"] += 1
            res["outcomes"][out.label] += 1
            res["by_class"][case.cls][out.label] += 1
            variant = f"{case.cls}/{case.variant.split(':')[0]}"
            res["by_variant"].setdefault(variant, Counter())[out.label] += 1
            res["hung"] += out.label == "hung"
            res["resets"] += out.reset
            ok = out.label in case.expect
            if verbose:
                shake = f" after a {case.shake.describe(target)}" if case.shake else ""
                print(f"[{backend} #{i}] {case.cls}/{case.variant}{shake}: sent "
                      f"{len(case.payload)} bytes {case.payload[:64].hex()}"
                      f"{'...' if len(case.payload) > 64 else ''}"
                      f"\n    expected {sorted(case.expect)}, got {out.label} {out.codes} "
                      f"{out.note} -> {'ok' if ok else 'UNEXPECTED'}")
            if not ok:
                res["unexpected"] += 1
                key = f"{variant} -> {out.label}"
                res["unexpected_by_variant"][key] += 1
                res["first_unexpected"].setdefault(key, {"index": i,
                                                         "expected": sorted(case.expect)})
                if len(res["examples"]) < EXAMPLES:
                    res["examples"].append(_example(seed, i, case, out, backend))
            if not prod.alive():
                res["crashes"].append({**_example(seed, i, case, out, backend),
                                       "exitcode": prod.proc.exitcode})
                prod.stop()
                prod = Producer(backend, secret)  # and go on: count every crash
                target = make_target(backend, prod, secret, consumer)
                base = settle(prod, {"threads": 0, "fds": 0}, wait_s=0.5)
            if n % 100 == 99:
                prog.step(f"{backend}: {n + 1}/{len(indices)} inputs")
        res["elapsed_s"] = time.perf_counter() - t0
        after = settle(prod, base)
        res["threads_after"], res["fds_after"] = after["threads"], after["fds"]
        res["leaked_threads"] = max(0, after["threads"] - base["threads"])
        res["leaked_fds"] = max(0, after["fds"] - base["fds"])
        res["thread_exceptions"] = after["thread_exceptions"]
        res["producer_log"] = after["log"]
        # The producer's own count, to cross-check the replies seen here.
        res["producer_metrics"] = {k: after["metrics"].get(k) for k in
                                   ("protocol_errors", "handshakes_refused", "pulls_served")}
        err = pull_verified(consumer, prod, TARGET, TARGET_BLOCKS)
        res["still_serving"] = err is None and prod.alive()
        res["still_serving_error"] = err
    finally:
        consumer.close()
        prod.stop()
    return finish(res)


def finish(res: dict) -> dict:
    """Counters to plain dicts, rates and the verdict."""
    res["inputs_per_s"] = res["inputs"] / res["elapsed_s"] if res["elapsed_s"] else 0.0
    for key in ("outcomes", "unexpected_by_variant"):
        res[key] = dict(res[key])
    for key in ("by_class", "by_variant"):
        res[key] = {c: dict(v) for c, v in sorted(res[key].items())}
    res["failed"] = failures(res)
    return res


def failures(res: dict) -> list[str]:
    """Why a transport's run fails (empty: it passes)."""
    out = [res["error"]] if res["error"] else []
    if res["crashes"]:
        out.append(f"{len(res['crashes'])} crash(es)")
    if res["hung"]:
        out.append(f"{res['hung']} hung")
    for label in ("bad_reply", "refused", "leak"):
        if res["outcomes"].get(label):
            out.append(f"{res['outcomes'][label]} {label}")
    if res["unexpected"]:
        out.append(f"{res['unexpected']} unexpected replies")
    if res["thread_exceptions"]:
        out.append(f"{len(res['thread_exceptions'])} unhandled exceptions in producer threads")
    if res["leaked_threads"] or res["leaked_fds"]:
        out.append(f"leaked {res['leaked_threads']} threads, {res['leaked_fds']} fds")
    if not res["still_serving"]:
        out.append(f"not serving afterwards: {res['still_serving_error']}")
    return out


# -- report --------------------------------------------------------------------------

def render(results: list[dict], seed: int) -> str:
    names = [r["transport"] for r in results]
    summary = table(
        ["transport", "inputs", "error frames", "closed", "other replies", "hung", "crashes",
         "unexpected", "thread exc.", "still serving", "leaked thr/fds", "inputs/s"],
        [[r["transport"], r["inputs"],
          sum(v for k, v in r["outcomes"].items() if k.startswith(("error:", "pull:"))),
          r["outcomes"].get("closed", 0),
          sum(v for k, v in r["outcomes"].items() if k in ("grant", "accept")),
          r["hung"], len(r["crashes"]), r["unexpected"], len(r["thread_exceptions"]),
          "yes" if r["still_serving"] else "NO",
          "?" if r["leaked_fds"] is None else f"{r['leaked_threads']}/{r['leaked_fds']}",
          f"{r['inputs_per_s']:.0f}"] for r in results])
    order = lambda k: (not k.startswith("error:"), not k.startswith("pull:"), k)  # noqa: E731
    labels = sorted({k for r in results for k in r["outcomes"]}, key=order)
    outcomes = table(["reply", *names],
                     [[k, *(r["outcomes"].get(k, 0) for r in results)] for k in labels])
    rows = []
    for c in CLASSES:
        got = sorted({k for r in results for k in r["by_class"].get(c, {})}, key=order)
        rows += [[c if n == 0 else "", k, *(r["by_class"][c].get(k, 0) for r in results)]
                 for n, k in enumerate(got)]
    classes = table(["input class", "reply", *names], rows)
    parts = [summary, "replies by kind (error frames by code):\n" + outcomes,
             "replies by input class:\n" + classes]
    keys = sorted({k for r in results for k in r["unexpected_by_variant"]})
    if keys:
        first = {k: r["first_unexpected"][k] for r in reversed(results)
                 for k in r["first_unexpected"]}
        parts.append("unexpected replies (input -> reply: count):\n" + table(
            ["input -> reply", "expected", *names, "replay one (with --transports T)"],
            [[k, " or ".join(first[k]["expected"]),
              *(r["unexpected_by_variant"].get(k, 0) for r in results),
              f"--seed {seed} --only {first[k]['index']}"] for k in keys]))
    crashes = [(r["transport"], c) for r in results for c in r["crashes"]]
    for name, c in crashes[:10]:
        parts.append(f"CRASH {name}: input #{c['index']} {c['class']}/{c['variant']} "
                     f"(exit code {c['exitcode']}): {c['replay']}")
    died = sorted({t for r in results for t in r["thread_exceptions"]})
    if died:
        parts.append("producer threads killed by an unhandled exception:\n" + table(
            ["exception", *names], [[t, *(r["thread_exceptions"].count(t) for r in results)]
                                    for t in died]))
    errors = [f"{r['transport']}: {r['error']}" for r in results if r["error"]]
    return "\n\n".join(parts + errors)


# -- entry points ------------------------------------------------------------------------

def _add(parser: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    # The ``bench`` parser may define the shared flags (--quick, --json) already.
    if not any(f in parser._option_string_actions for f in flags):
        parser.add_argument(*flags, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvbridge bench chaos --fuzz``."""
    _add(parser, "--quick", action="store_true",
         help=f"{QUICK_INPUTS} inputs per transport instead of {FULL_INPUTS}")
    _add(parser, "--json", metavar="PATH", help="also write the results here")
    _add(parser, "--inputs", type=int, metavar="N", help="inputs per transport")
    _add(parser, "--transports", metavar="LIST",
         help="comma-separated: tcp,cma,nixl (default: every available one)")
    _add(parser, "--seed", type=int, default=SEED, help=f"input RNG seed [{SEED}]")
    _add(parser, "--deadline", type=float, default=DEADLINE_S, metavar="S",
         help=f"seconds a reply may take before the input counts as hung [{DEADLINE_S}]")
    _add(parser, "--only", metavar="LIST",
         help="replay these input indices (comma-separated), printing each; writes nothing")


def run(args: argparse.Namespace) -> int:
    """Fuzz every requested transport; 0 if none crashed, hung, leaked, gave an
    unexpected reply, lost a thread to an exception or stopped serving."""
    from kvbridge.transport import ALIASES, BACKENDS, available

    quick = bool(getattr(args, "quick", False))
    seed = getattr(args, "seed", None)
    seed = SEED if seed is None else int(seed)
    deadline = float(getattr(args, "deadline", None) or DEADLINE_S)
    n = getattr(args, "inputs", None) or (QUICK_INPUTS if quick else FULL_INPUTS)
    only = getattr(args, "only", None)
    indices = [int(i) for i in only.split(",") if i.strip()] if only else list(range(n))
    here = available()
    requested = getattr(args, "transports", None)
    backends = []
    for name in (requested.split(",") if requested else here):
        key = ALIASES.get(name.strip(), name.strip())
        if key not in BACKENDS or key not in here:
            print(f"transport {name!r} is not available here; available: {here}",
                  file=sys.stderr)
            return 2
        backends.append(key)
    print(f"fuzzing {', '.join(backends)}: {len(indices)} inputs each, seed {seed}, "
          f"deadline {deadline:g} s", file=sys.stderr)
    prog = Progress(len(backends) * (len(indices) // 100), enabled=not only)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    results = []
    for backend in backends:
        try:
            results.append(fuzz_backend(backend, indices, seed, deadline, prog,
                                        verbose=bool(only)))
        except Exception as e:  # noqa: BLE001 - the set-up failed: a failed result
            res = new_result(backend, len(indices))
            res["error"] = f"{type(e).__name__}: {e}"
            results.append(finish(res))
    elapsed = time.perf_counter() - started
    text = render(results, seed)
    footer = (f"seed {seed}; {len(indices)} inputs per transport in {len(CLASSES)} classes "
              f"({', '.join(CLASSES)}), each on a fresh connection, write side shut after "
              f"sending; reply deadline {deadline:g} s; producer: a real transport in its "
              f"own process with a shared secret. total time {elapsed:.1f} s; 1-min load "
              f"average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.")
    print(text + "\n\n" + footer)
    bad = {r["transport"]: r["failed"] for r in results if r["failed"]}
    for backend, why in bad.items():
        print(f"FAIL {backend}: {'; '.join(why)}", file=sys.stderr)
    if only:
        return 1 if bad else 0
    name = "chaos-fuzz" + ("-quick" if quick else "")
    payload = {"seed": seed, "inputs_per_transport": len(indices), "deadline_s": deadline,
               "classes": list(CLASSES), "elapsed_s": elapsed, "loadavg_start": load_start,
               "loadavg_end": os.getloadavg()[0], "results": results}
    out = write_results(name, payload, text + "\n\n" + footer, getattr(args, "json", None))
    print(f"\nwrote {out}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbridge.bench.fuzz",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
