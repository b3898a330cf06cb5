"""The `tritium` command: argument parsing only; the work happens in the layers below."""

import argparse
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritium", description="LLM inference around one unified Triton kernel.")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks: tables, JSON and PNG plots, peers timed in the same run")
    suites = bench.add_subparsers(dest="suite", required=True)
    kernels = suites.add_parser("kernels", help="the attention scenario suite against FlashAttention-3 and others")
    kernels.add_argument("--quick", action="store_true",
                         help="shrunk scenarios (always so without a GPU: kernels then run in Triton's interpreter)")
    kernels.add_argument("--page-size", type=int, default=16, help="KV-cache page size in tokens (default 16)")
    kernels.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    kernels.add_argument("--scenario", action="append", metavar="TEXT",
                         help="run only scenarios whose name contains TEXT (repeatable)")
    kernels.add_argument("--peer", action="append", metavar="NAME", help="time only these peers (repeatable)")
    kernels.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")

    tune = commands.add_parser("tune", help="tune the attention kernel for this GPU and cache the winning configs")
    tune.add_argument("--scenario", action="append", metavar="TEXT", help="tune only matching scenarios (repeatable)")
    tune.add_argument("--page-size", type=int, default=16, help="KV-cache page size in tokens (default 16)")
    tune.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    tune.add_argument("--cache", type=Path, default=None,
                      help="JSON file to merge the winners into (default: the user cache the kernel reads)")

    args = parser.parse_args(argv)
    if args.command == "tune":
        import torch

        from tritium.bench.tune import tune as run_tune

        try:
            run_tune(args.scenario, args.page_size, getattr(torch, args.dtype), args.cache)
        except (ValueError, RuntimeError) as exc:
            parser.exit(2, f"tritium tune: {exc}\n")
    elif args.command == "bench" and args.suite == "kernels":
        if args.page_size < 1:
            parser.error(f"--page-size must be a positive number of tokens, got {args.page_size}")
        import torch

        from tritium.bench.kernels import run_kernel_bench

        peers = args.peer
        if peers and "tritium" not in peers:
            peers = ["tritium", *peers]
        try:
            run_kernel_bench(args.scenario, args.page_size, getattr(torch, args.dtype), args.quick, peers, args.out)
        except ValueError as exc:
            parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
