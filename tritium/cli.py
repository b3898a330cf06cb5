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

    throughput = suites.add_parser("throughput", help="engine generation speed on random prompts, beside transformers")
    throughput.add_argument("--model-config", default=None, metavar="NAME",
                            help="random weights in a real model's shape: " + ", ".join(_model_shapes()))
    throughput.add_argument("--model", default=None, metavar="DIR", help="a Hugging Face model folder instead")
    throughput.add_argument("--num-prompts", type=int, default=256)
    throughput.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    throughput.add_argument("--output-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    throughput.add_argument("--single", action="store_true", help="one stream (latency mode) instead of the batch")
    throughput.add_argument("--hf-prompts", type=int, default=32,
                            help="requests transformers' generate runs as the peer (0: no peer)")
    throughput.add_argument("--seed", type=int, default=0)
    throughput.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")

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
    elif args.command == "bench" and args.suite == "throughput":
        if (args.model is None) == (args.model_config is None):
            parser.error("give one of --model-config NAME or --model DIR")
        if args.model_config is not None and args.model_config not in _model_shapes():
            parser.error(f"unknown --model-config {args.model_config!r}; known: {', '.join(_model_shapes())}")
        for name in ("input_len", "output_len"):
            lo, hi = getattr(args, name)
            if not 1 <= lo <= hi:
                parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")
        if args.num_prompts < 1 or args.hf_prompts < 0:
            parser.error("--num-prompts must be >= 1 and --hf-prompts >= 0")
        from tritium.bench.throughput import Workload, run_throughput_bench

        workload = Workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), args.seed)
        try:
            run_throughput_bench(args.model or args.model_config, workload, args.single, args.hf_prompts, args.out)
        except (ValueError, RuntimeError) as exc:
            parser.exit(2, f"tritium bench throughput: {exc}\n")
    return 0


def _model_shapes() -> list[str]:
    from tritium.bench.model_shapes import MODEL_SHAPES

    return list(MODEL_SHAPES)


if __name__ == "__main__":
    sys.exit(main())
