# SPDX-License-Identifier: Apache-2.0
"""The ``kvbridge`` command.

Subcommands:
  tiny-model OUT_DIR     build a tiny local model (tokenizer + weights; --arch llama|qwen3|
                         gemma3|deepseek_v2)
  info [--json]          which copy path is in use, what was built, versions
  bench blocks           gather/scatter benchmark against memcpy
  bench transport        transports between two processes against baselines
  bench chaos            a P/D pair behind the proxy under load while faults fire
  proxy                  OpenAI-compatible router over prefill/decode pools
  up                     the one-command prefill/decode demo
  demo-blocks            export blocks in one process, import them in another
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from kvbridge.demo import tiny_model

    out = tiny_model.build(args.out_dir, seed=args.seed, arch=args.arch)
    print(f"tiny {args.arch} model written to {out} "
          f"(digest {tiny_model.tree_digest(out)[:16]})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from kvbridge.info import collect

    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def _cmd_bench_blocks(args: argparse.Namespace) -> int:
    from kvbridge.bench import blocks

    blocks.run(quick=args.quick, json_path=args.json)
    return 0


def _cmd_bench_transport(args: argparse.Namespace) -> int:
    from kvbridge.bench import transport

    return transport.run(args)


def _cmd_bench_chaos(args: argparse.Namespace) -> int:
    from kvbridge.bench import chaos

    return chaos.run(args)


def _cmd_up(args: argparse.Namespace) -> int:
    from kvbridge.serve import up

    return up.main(args)


def _cmd_proxy(args: argparse.Namespace) -> int:
    from kvbridge.serve import proxy

    return proxy.main(args)


def _cmd_demo_blocks(args: argparse.Namespace) -> int:
    from kvbridge.demo.blocks import main as demo

    return demo(num_blocks=args.blocks, model_dir=args.model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvbridge", description="KV-cache transfer for "
                                "disaggregated LLM serving")
    sub = p.add_subparsers(dest="cmd", required=True)

    from kvbridge.demo.tiny_model import ARCHS

    t = sub.add_parser("tiny-model", help="build a tiny local model (" + ", ".join(ARCHS) + ")")
    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--arch", choices=ARCHS, default=ARCHS[0],
                   help="model architecture: llama (default; GQA), qwen3 (q/k norm), "
                        "gemma3 (sliding-window + full attention layers: two KV cache "
                        "groups), deepseek_v2 (MLA: one 576-wide latent per token)")
    t.set_defaults(func=_cmd_tiny_model)

    i = sub.add_parser("info", help="kernels, transports and versions")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_info)

    b = sub.add_parser("bench", help="benchmarks (results go to benchmarks/results/)")
    bsub = b.add_subparsers(dest="what", required=True)
    bb = bsub.add_parser("blocks", help="gather/scatter vs memcpy")
    bb.add_argument("--quick", action="store_true", help="a subset that runs in under 30 s")
    bb.add_argument("--json", metavar="PATH", help="also write the results here")
    bb.set_defaults(func=_cmd_bench_blocks)
    bt = bsub.add_parser("transport", help="transports between two processes")
    from kvbridge.bench import transport as bench_transport

    bench_transport.add_arguments(bt)
    bt.set_defaults(func=_cmd_bench_transport)
    bc = bsub.add_parser("chaos", help="P/D servers behind kvbridge proxy under load while "
                         "faults are injected (--fuzz: the protocol fuzzer)")
    from kvbridge.bench import chaos as bench_chaos

    bench_chaos.add_arguments(bc)
    bc.set_defaults(func=_cmd_bench_chaos)

    pr = sub.add_parser("proxy", help="OpenAI-compatible prefill/decode router")
    from kvbridge.serve import proxy as proxy_mod

    proxy_mod.add_arguments(pr)
    pr.set_defaults(func=_cmd_proxy)

    u = sub.add_parser("up", help="start prefill + decode + router, run demo requests")
    from kvbridge.serve import up as up_mod

    up_mod.add_arguments(u)
    u.set_defaults(func=_cmd_up)

    d = sub.add_parser("demo-blocks", help="export blocks in one process, import in another")
    d.add_argument("--blocks", type=int, default=64)
    d.add_argument("--model", default=None, help="tiny model dir (built if missing)")
    d.set_defaults(func=_cmd_demo_blocks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
