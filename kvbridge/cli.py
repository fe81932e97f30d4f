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

    out = tiny_model.build(args.out_dir, seed=args.seed, arch=args.arch,
                           kv_shape=args.kv_shape)
    kv = tiny_model.kv_bytes_per_token(args.arch, args.kv_shape)
    print(f"tiny {args.arch} model{f' with the KV shape of {args.kv_shape}' if args.kv_shape else ''}"
          f" written to {out} (KV {kv // 1024} KiB per token; digest "
          f"{tiny_model.tree_digest(out)[:16]})")
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


def _tiny_model_arguments(t: argparse.ArgumentParser) -> None:
    from kvbridge.demo.tiny_model import ARCHS, KV_SHAPES

    t.add_argument("out_dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--arch", choices=ARCHS, default=ARCHS[0],
                   help="model architecture: llama (default; GQA), qwen3 (q/k norm), "
                        "gemma3 (sliding-window + full attention layers: two KV cache "
                        "groups), deepseek_v2 (MLA: one 576-wide latent per token)")
    t.add_argument("--kv-shape", choices=sorted(KV_SHAPES), default=None,
                   help="give the KV cache a real model's shape, little compute besides: "
                        "llama8b = 32 layers x 8 KV heads x 128 (Llama-3-8B, 128 KiB per "
                        "token); llama and qwen3 only")


def _info_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("--json", action="store_true", help="print JSON")


def _bench_blocks_arguments(bb: argparse.ArgumentParser) -> None:
    bb.add_argument("--quick", action="store_true", help="a subset that runs in under 30 s")
    bb.add_argument("--json", metavar="PATH", help="also write the results here")


def _delegate(module: str):
    """Arguments defined by the subcommand's own module, imported only when
    that subcommand is the one being run (or asked for its --help)."""
    def add(parser: argparse.ArgumentParser) -> None:
        import importlib

        importlib.import_module(module).add_arguments(parser)
    return add


def _demo_blocks_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--blocks", type=int, default=64)
    d.add_argument("--model", default=None, help="tiny model dir (built if missing)")


#: name -> (help, adds the subcommand's arguments, runs it). The arguments of
#: a subcommand are built only when it is named on the command line, so
#: ``kvbridge --help`` imports none of the proxy, benchmark or vLLM modules.
COMMANDS = {
    "tiny-model": ("build a tiny local model (llama, qwen3, gemma3, deepseek_v2)",
                   _tiny_model_arguments, _cmd_tiny_model),
    "info": ("kernels, transports and versions", _info_arguments, _cmd_info),
    "proxy": ("OpenAI-compatible prefill/decode router", _delegate("kvbridge.serve.proxy"),
              _cmd_proxy),
    "up": ("start prefill + decode + router, run demo requests", _delegate("kvbridge.serve.up"),
           _cmd_up),
    "demo-blocks": ("export blocks in one process, import in another", _demo_blocks_arguments,
                    _cmd_demo_blocks),
}
BENCH_COMMANDS = {
    "blocks": ("gather/scatter vs memcpy", _bench_blocks_arguments, _cmd_bench_blocks),
    "transport": ("transports between two processes", _delegate("kvbridge.bench.transport"),
                  _cmd_bench_transport),
    "chaos": ("P/D servers behind kvbridge proxy under load while faults are injected "
              "(--fuzz: the protocol fuzzer)", _delegate("kvbridge.bench.chaos"),
              _cmd_bench_chaos),
}


def _add_commands(sub, commands: dict, chosen: str | None) -> None:
    for name, (help_text, add_arguments, run) in commands.items():
        parser = sub.add_parser(name, help=help_text)
        parser.set_defaults(func=run)
        if chosen is None or name == chosen:
            add_arguments(parser)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every subcommand is listed, only the one that
    ``argv`` names gets its arguments built (``argv=None``: all of them)."""
    words = None if argv is None else [a for a in argv if not a.startswith("-")] + ["", ""]
    p = argparse.ArgumentParser(prog="kvbridge", description="KV-cache transfer for "
                                "disaggregated LLM serving")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_commands(sub, COMMANDS, None if words is None else words[0])
    b = sub.add_parser("bench", help="benchmarks (results go to benchmarks/results/)")
    bsub = b.add_subparsers(dest="what", required=True)
    _add_commands(bsub, BENCH_COMMANDS,
                  None if words is None else (words[1] if words[0] == "bench" else ""))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
