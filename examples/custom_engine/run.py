# SPDX-License-Identifier: Apache-2.0
"""Disaggregated prefill/decode between two processes of a custom engine.

    python examples/custom_engine/run.py [--transport tcp|cma|nixl] [--prompt TEXT]
        [--tokens N] [--model DIR] [--block-size-b N] [--dtype-b float32|bfloat16] [--json]

* Process **A** (prefill) runs the prompt through its ``PagedEngine``, keeps
  the blocks, publishes them with a ``KVAgent`` and hands the ``KVTicket`` plus
  the first generated token to B over a pipe. It frees the blocks once
  ``poll_released()`` says B read them (or when told to stop, or on timeout).
* Process **B** (decode) has its own engine whose blocks are numbered
  differently, checks layouts with A (``handshake``), pulls the blocks into
  blocks of its own, ``adopt``\\ s them and continues greedy decoding - without
  ever running the prompt through its model.
* The parent starts both (spawn), collects their reports, runs the same
  engine single-process as the reference and compares token by token.

``--block-size-b`` / ``--dtype-b`` give B a cache that does not match A's:
the handshake refuses it with a ``LayoutMismatchError`` naming the fields, both
processes stop, and the exit code is 3.

Exit codes: 0 success, 1 failure (mismatching tokens, a process error),
3 layout mismatch, 4 timeout.

``run()`` is the importable core (it returns a dict; ``--json`` prints it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from pathlib import Path

# engine.py sits next to this file; spawned children find it through sys.path,
# which multiprocessing passes on to them.
sys.path.insert(0, str(Path(__file__).resolve().parent))

EXIT_OK, EXIT_FAILED, EXIT_LAYOUT, EXIT_TIMEOUT = 0, 1, 3, 4
REQUEST_ID = "req-0"
DEFAULT_PROMPT = ("Return a new list containing all items from the iterable in ascending "
                  "order. A custom key function can be supplied to customize the sort order.")
#: Dummy blocks B's engine holds before the pull, so its block ids differ from A's.
B_BUSY_BLOCKS = 5
#: One thread per process: float reductions then happen in one fixed order in
#: every process, so A, B and the reference are bit-for-bit comparable (and two
#: processes do not fight over the cores).
THREADS = 1


def _say(role: str, msg: str) -> None:
    print(f"[{role}] {msg}", flush=True)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------- process A

def producer_main(cfg: dict, to_b: Connection, parent: Connection) -> None:
    """Prefill, publish, wait until B has read the blocks, free them."""
    import torch

    from engine import PagedEngine
    from kvbridge.agent import KVAgent
    from kvbridge.transport import TransportConfig

    torch.set_num_threads(THREADS)
    agent = None
    report: dict = {"role": "A", "ok": False}
    try:
        engine = PagedEngine(cfg["model_dir"], num_blocks=cfg["num_blocks"],
                             block_size=cfg["block_size"])
        prompt_ids = cfg["prompt_ids"]
        first = engine.prefill(REQUEST_ID, prompt_ids)
        blocks = engine.block_table(REQUEST_ID)
        _say("A", f"prefilled {len(prompt_ids)} prompt tokens into blocks {blocks}; "
                  f"first token {first}")

        # The lease is a safety net: if B never reads, the blocks come back anyway.
        config = TransportConfig(lease_s=cfg["timeout"])
        agent = KVAgent(engine.kv_tensors, engine.kv_layout(), transport=cfg["transport"],
                        config=config, name="engine-A")
        address = agent.serve()
        ticket = agent.publish(REQUEST_ID, blocks, num_tokens=len(prompt_ids))
        _say("A", f"serving on {address} ({cfg['transport']}); published {REQUEST_ID}, "
                  f"layout {ticket.layout_fingerprint}")
        to_b.send({"ticket": ticket.to_json().decode(), "first_token": first})

        # Keep the blocks until kvbridge says they may go: B read them
        # ("read"), the lease ran out ("expired"), or we released them.
        reason = None
        deadline = time.monotonic() + cfg["timeout"]
        while reason is None and time.monotonic() < deadline:
            for rid, why in agent.poll_released():
                if rid == REQUEST_ID:
                    reason = why
            if reason is None and parent.poll(0.01):
                stop = parent.recv()
                _say("A", f"told to stop ({stop}); releasing {REQUEST_ID}")
                agent.release(REQUEST_ID)
        if reason is None:
            _say("A", "timed out waiting for the consumer; releasing")
            agent.release(REQUEST_ID)
            reason = "timeout"
        engine.free(REQUEST_ID)
        _say("A", f"{REQUEST_ID} released ({reason}); freed blocks {blocks}")
        metrics = agent.metrics()
        for refusal in metrics.get("refusals", []):
            _say("A", f"refused a consumer: {refusal}")
        report.update(ok=reason == "read", reason=reason, first_token=first, blocks=blocks,
                      forward_tokens=engine.forward_tokens, address=address,
                      metrics=metrics, layout=engine.kv_layout().to_dict())
    except Exception as e:  # noqa: BLE001 - reported to the parent
        report.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        _say("A", f"error: {report['error']}")
    finally:
        if agent is not None:
            agent.close()
        parent.send(report)


# ---------------------------------------------------------------------- process B

def consumer_main(cfg: dict, from_a: Connection, parent: Connection) -> None:
    """Pull A's blocks into our own, then continue decoding from them."""
    import torch

    from engine import PagedEngine
    from kvbridge.agent import KVAgent, KVTicket
    from kvbridge.layout import LayoutMismatchError
    from kvbridge.transport import TransferState

    torch.set_num_threads(THREADS)
    agent = None
    report: dict = {"role": "B", "ok": False}
    try:
        engine = PagedEngine(cfg["model_dir"], num_blocks=cfg["num_blocks"],
                             block_size=cfg["block_size_b"],
                             kv_dtype=_torch_dtype(cfg["dtype_b"]))
        busy = engine.allocate(B_BUSY_BLOCKS)  # stand-ins for other requests
        agent = KVAgent(engine.kv_tensors, engine.kv_layout(), transport=cfg["transport"],
                        name="engine-B")
        if not from_a.poll(cfg["timeout"]):
            raise TimeoutError("no ticket from the prefill process")
        msg = from_a.recv()
        ticket = KVTicket.from_json(msg["ticket"])
        first = msg["first_token"]
        _say("B", f"got ticket for {ticket.request_id}: {len(ticket.block_ids)} blocks "
                  f"{ticket.block_ids} at {ticket.address}, first token {first}")
        if ticket.layout_fingerprint != engine.kv_layout().fingerprint():
            _say("B", "layout fingerprint differs from ours; the handshake will say how")

        # Check layouts before allocating anything: with another block size
        # even the number of blocks to allocate would be wrong.
        agent.handshake(ticket.address)
        local = engine.allocate(engine.blocks_needed(ticket.num_tokens))
        handle = agent.pull(ticket, local)
        states = [handle.state.value]
        deadline = time.monotonic() + cfg["timeout"]
        while not handle.done() and time.monotonic() < deadline:
            handle.wait(0.001)
            if handle.state.value != states[-1]:
                states.append(handle.state.value)
        if handle.state != TransferState.DONE:
            engine.release_blocks(local)
            handle.cancel()
            raise RuntimeError(f"pull ended {handle.state.value}: {handle.error}")
        _say("B", f"pulled {handle.nbytes} bytes into blocks {local} in "
                  f"{handle.duration_s * 1e3:.2f} ms (states seen: {' -> '.join(states)})")

        engine.adopt(ticket.request_id, local, ticket.num_tokens)
        steps = cfg["tokens"] - 1
        rest = engine.decode(ticket.request_id, first, steps)
        _say("B", f"decoded {steps} tokens; forward passes over {engine.forward_tokens} tokens")
        engine.free(ticket.request_id)
        engine.release_blocks(busy)
        report.update(ok=True, tokens=[first, *rest], forward_tokens=engine.forward_tokens,
                      decode_steps=steps, local_blocks=local, remote_blocks=ticket.block_ids,
                      bytes=handle.nbytes, transfer_s=handle.duration_s, states=states,
                      metrics=agent.metrics())
    except LayoutMismatchError as e:
        report.update(error=str(e), kind="layout",
                      differences=[list(map(str, d)) for d in e.differences])
        _say("B", f"pull refused at handshake: {e}")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        report.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        _say("B", f"error: {report['error']}")
    finally:
        if agent is not None:
            agent.close()
        parent.send(report)


# ---------------------------------------------------------------------- parent

def run(transport: str = "auto", prompt: str = DEFAULT_PROMPT, tokens: int = 16, *,
        model_dir: str | os.PathLike | None = None, block_size: int = 16,
        block_size_b: int | None = None, dtype_b: str = "float32", num_blocks: int = 64,
        timeout: float = 60.0) -> dict:
    """Run A and B, compare with a single-process generation; returns a report
    whose ``exit_code`` is what ``main`` exits with."""
    import torch

    from engine import PagedEngine
    from kvbridge.demo import tiny_model

    if tokens < 1:
        raise ValueError("tokens must be >= 1")
    model_dir = Path(model_dir) if model_dir else tiny_model.ensure(tiny_model.default_path())
    reference = PagedEngine(model_dir, num_blocks=num_blocks, block_size=block_size)
    prompt_ids = reference.encode(prompt)
    cfg = dict(model_dir=str(model_dir), transport=transport, prompt_ids=prompt_ids,
               tokens=tokens, block_size=block_size, num_blocks=num_blocks,
               block_size_b=block_size_b or block_size, dtype_b=dtype_b, timeout=timeout)
    _say("parent", f"model {model_dir.name}, transport {transport}, "
                   f"{len(prompt_ids)} prompt tokens, {tokens} new tokens")

    ctx = mp.get_context("spawn")
    a_end, b_end = ctx.Pipe()          # A -> B: the ticket
    a_parent, a_child = ctx.Pipe()     # reports (and "stop" to A)
    b_parent, b_child = ctx.Pipe()
    procs = {
        "A": ctx.Process(target=producer_main, args=(cfg, a_end, a_child), name="prefill-A"),
        "B": ctx.Process(target=consumer_main, args=(cfg, b_end, b_child), name="decode-B"),
    }
    pipes = {"A": a_parent, "B": b_parent}
    reports: dict[str, dict] = {}
    timed_out = False
    t0 = time.monotonic()
    for p in procs.values():
        p.start()
    try:
        reports, timed_out = _collect(procs, pipes, deadline=t0 + timeout + 30)
    finally:
        _reap(procs)
    wall = time.monotonic() - t0

    a, b = reports.get("A", {}), reports.get("B", {})
    result: dict = dict(transport=transport, prompt_ids=prompt_ids, tokens_requested=tokens,
                        wall_s=wall, a=a, b=b, pids={r: p.pid for r, p in procs.items()},
                        exitcodes={r: p.exitcode for r, p in procs.items()})
    if b.get("kind") == "layout":
        result.update(exit_code=EXIT_LAYOUT, error=b["error"])
        return result
    if timed_out:
        result.update(exit_code=EXIT_TIMEOUT, error=f"timed out after {timeout + 30:.0f} s")
        return result
    errors = [f"{r}: {rep.get('error', 'no report (process died)')}"
              for r, rep in (("A", a), ("B", b)) if not rep.get("ok")]
    if errors:
        result.update(exit_code=EXIT_FAILED, error="; ".join(errors))
        return result

    # The same engine alone: prefill + decode in one process. Run after A and B
    # have exited so it does not compete with them for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        ref_tokens = reference.generate("reference", prompt_ids, tokens)
    finally:
        torch.set_num_threads(threads)
    match = b["tokens"] == ref_tokens
    prompt_only = b["forward_tokens"] == b["decode_steps"]
    result.update(
        tokens=b["tokens"], reference_tokens=ref_tokens, match=match,
        text=reference.detokenize(b["tokens"]), reference_text=reference.detokenize(ref_tokens),
        b_forward_tokens=b["forward_tokens"], decode_steps=b["decode_steps"],
        a_forward_tokens=a["forward_tokens"], bytes=b["bytes"], transfer_s=b["transfer_s"],
        gbps=b["bytes"] / b["transfer_s"] / 1e9 if b["transfer_s"] else 0.0,
        states=b["states"])
    if not match:
        result.update(exit_code=EXIT_FAILED, error="continuation differs from the "
                                                   "single-process generation")
    elif not prompt_only:
        result.update(exit_code=EXIT_FAILED,
                      error=f"B ran {b['forward_tokens']} tokens through its model for "
                            f"{b['decode_steps']} decode steps")
    else:
        result.update(exit_code=EXIT_OK, error=None)
    return result


def _collect(procs: dict, pipes: dict, deadline: float) -> tuple[dict[str, dict], bool]:
    """Wait for both reports; stop A as soon as B gives up (it would otherwise
    hold its blocks until the lease ends). Returns (reports, timed_out)."""
    reports: dict[str, dict] = {}
    stopped_a = False
    while len(reports) < 2:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return reports, True
        waitables = [pipes[r] for r in pipes if r not in reports]
        waitables += [procs[r].sentinel for r in procs if r not in reports]
        ready = wait_any(waitables, timeout=min(remaining, 1.0))
        for role, pipe in pipes.items():
            if role in reports:
                continue
            if pipe in ready or pipe.poll():
                try:
                    reports[role] = pipe.recv()
                except EOFError:
                    reports[role] = {"role": role, "ok": False, "error": "process died"}
            elif procs[role].sentinel in ready and not pipe.poll(0.5):
                reports[role] = {"role": role, "ok": False,
                                 "error": f"process exited ({procs[role].exitcode}) without "
                                          "a report"}
        if "B" in reports and not reports["B"].get("ok") and "A" not in reports and not stopped_a:
            try:
                pipes["A"].send(f"consumer failed: {reports['B'].get('error')}")
            except OSError:
                pass
            stopped_a = True
        if "A" in reports and not reports["A"].get("ok") and "B" not in reports:
            # Without A nothing is coming B's way: do not wait for its timeout.
            if procs["B"].is_alive():
                procs["B"].terminate()
    return reports, False


def _reap(procs: dict) -> None:
    """Join every child; kill what does not exit, so nothing outlives us."""
    for p in procs.values():
        if p.pid is None:
            continue
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def _print_summary(r: dict) -> None:
    say = lambda m: _say("parent", m)  # noqa: E731
    if r.get("tokens") is not None:
        say(f"continued tokens  {r['tokens']}")
        say(f"reference tokens  {r['reference_tokens']}")
        say(f"text: {r['text']!r}")
        say(f"moved {r['bytes']} bytes in {r['transfer_s'] * 1e3:.2f} ms "
            f"({r['gbps']:.3f} GB/s)")
        say(f"B ran {r['b_forward_tokens']} tokens through its model "
            f"({r['decode_steps']} decode steps, prompt of {len(r['prompt_ids'])} never)")
    if r["exit_code"] == EXIT_OK:
        say("OK: the continuation equals the single-process generation")
    else:
        say(f"FAILED (exit {r['exit_code']}): {r['error']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="auto", choices=["auto", "tcp", "cma", "nixl"])
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--tokens", type=int, default=16, help="new tokens in all (A makes the first)")
    ap.add_argument("--model", default=None, help="model directory [the tiny Llama, built "
                                                  "if missing]")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block (A; B too "
                                                               "unless --block-size-b)")
    ap.add_argument("--block-size-b", type=int, default=None, help="B's block size")
    ap.add_argument("--dtype-b", default="float32", choices=["float32", "bfloat16"],
                    help="B's KV-cache dtype")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds each side waits")
    ap.add_argument("--json", action="store_true", help="print the report as JSON (last line)")
    args = ap.parse_args(argv)
    result = run(args.transport, args.prompt, args.tokens, model_dir=args.model,
                 block_size=args.block_size, block_size_b=args.block_size_b,
                 dtype_b=args.dtype_b, timeout=args.timeout)
    _print_summary(result)
    if args.json:
        print(json.dumps(result, default=str), flush=True)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
