"""`tritium bench kernels | throughput | serve` and `tritium tune`: their options and the calls into tritium.bench."""

import argparse
from pathlib import Path

from tritium.cli.options import command, engine_config, engine_options, model_options, model_shapes

KERNEL_DTYPES = ("bfloat16", "float16")
RESULTS = Path("benchmarks/results")


def add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks: tables, JSON and PNG plots, peers timed in the same run",
                                description="Benchmarks: tables, JSON and PNG plots, peers timed in the same run.",
                                allow_abbrev=False)
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    _add_kernels(suites)
    _add_throughput(suites)
    _add_serve_load(suites)
    _add_bench_moe(suites)


def _add_kernels(suites) -> None:
    kernels = command(suites, "kernels", "the attention scenario suite against FlashAttention-3 and others")
    kernels.add_argument("--quick", action="store_true",
                         help="shrunk scenarios (always so without a GPU: kernels then run in Triton's interpreter; "
                         "default: off)")
    kernels.add_argument("--page-size", type=int, default=16, metavar="N",
                         help="KV-cache page size in tokens (default: %(default)s)")
    kernels.add_argument("--dtype", choices=KERNEL_DTYPES, default="bfloat16", help="default: %(default)s")
    kernels.add_argument("--scenario", action="append", metavar="TEXT",
                         help="run only scenarios whose name contains TEXT (repeatable; default: all)")
    kernels.add_argument("--peer", action="append", metavar="NAME",
                         help="time only these peers (repeatable; default: every peer that imports); tritium_fp8kv, "
                         "tritium_fp8 and tritium_fp8_bf16dot (Tritium on fp8 K/V pages, and an fp8 query) run only "
                         "when named")
    kernels.add_argument("--eager", action="store_true",
                         help="time each call as made (host cost included) instead of CUDA-graph replays "
                         "(default: off)")
    kernels.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and PNG (default: %(default)s)")
    kernels.set_defaults(run=_run_kernels)


def _run_kernels(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    from tritium.bench.kernels import run_kernel_bench

    if args.page_size < 1:
        parser.error(f"--page-size must be a positive number of tokens, got {args.page_size}")
    peers = args.peer
    if peers and "tritium" not in peers:
        peers = ["tritium", *peers]
    try:
        run_kernel_bench(args.scenario, args.page_size, getattr(torch, args.dtype), args.quick, peers, args.out,
                         args.eager)
    except ValueError as exc:
        parser.error(str(exc))


def _add_throughput(suites) -> None:
    throughput = command(suites, "throughput", "engine generation speed on random prompts, beside transformers")
    model_options(throughput, demo=False)
    throughput.add_argument("--num-prompts", type=int, default=256, metavar="N",
                            help="requests in the batch (default: %(default)s)")
    _length_options(throughput, "token")
    throughput.add_argument("--single", action="store_true",
                            help="one stream (latency mode) instead of the batch (default: off)")
    throughput.add_argument("--hf-prompts", type=int, default=32, metavar="N",
                            help="requests transformers' generate runs as the peer; 0: no peer (default: %(default)s)")
    throughput.add_argument("--device", choices=("cuda", "cpu"), default=None,
                            help="cpu runs it without a GPU: a check of the code path, not a measurement "
                            "(default: the GPU)")
    throughput.add_argument("--out", type=Path, default=RESULTS,
                            help="folder for JSON and PNG (default: %(default)s)")
    engine_options(throughput)  # its --seed also seeds the random prompts
    throughput.set_defaults(run=_run_throughput)


def _length_options(parser: argparse.ArgumentParser, unit: str) -> None:
    for name in ("input", "output"):
        parser.add_argument(f"--{name}-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"),
                            help=f"random {name} lengths in {unit}s, uniform in [MIN, MAX] (default: 100 1024)")


def _check_lengths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")


def _run_throughput(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tritium.bench.throughput import Workload, run_throughput_bench

    if (args.model is None) == (args.model_config is None):
        parser.error("give one of --model-config NAME or --model MODEL")
    if args.model_config is not None and args.model_config not in model_shapes():
        parser.error(f"unknown --model-config {args.model_config!r}; known: {', '.join(model_shapes())}")
    _check_lengths(parser, args)
    if args.num_prompts < 1 or args.hf_prompts < 0:
        parser.error("--num-prompts must be >= 1 and --hf-prompts >= 0")
    seed = 0 if args.seed is None else args.seed
    workload = Workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), seed)
    try:
        run_throughput_bench(args.model or args.model_config, workload, args.single, args.hf_prompts, args.out,
                             engine_config(args, seed=seed))
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"tritium bench throughput: {exc}\n")


def _add_serve_load(suites) -> None:
    serve = command(suites, "serve", "load on any OpenAI-compatible server: throughput, TTFT, TPOT, ITL")
    serve.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000 (required)")
    serve.add_argument("--model", default=None, help="model name to ask for (default: the server's first)")
    serve.add_argument("--num-prompts", type=int, default=64, metavar="N", help="requests (default: %(default)s)")
    serve.add_argument("--request-rate", type=float, default=float("inf"), metavar="R",
                       help="requests per second, Poisson arrivals (default: inf, all at once)")
    serve.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                       help='JSONL of {"prompt": str} lines (default: random words)')
    _length_options(serve, "word")
    serve.add_argument("--api-key", default=None, metavar="KEY", help="the server's API key (default: none)")
    serve.add_argument("--seed", type=int, default=0, help="seed of the random prompts and arrivals "
                       "(default: %(default)s)")
    serve.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and PNG (default: %(default)s)")
    serve.set_defaults(run=_run_serve_load)


def _run_serve_load(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_lengths(parser, args)
    if args.num_prompts < 1 or not args.request_rate > 0:
        parser.error("--num-prompts must be >= 1 and --request-rate > 0")
    import httpx

    from tritium.bench.serve import run_serve_bench

    try:
        run_serve_bench(args.url, args.num_prompts, args.request_rate, args.prompts, tuple(args.input_len),
                        tuple(args.output_len), args.model, args.api_key, args.seed, args.out)
    except (ValueError, OSError, httpx.HTTPError) as exc:
        parser.exit(2, f"tritium bench serve: {exc}\n")


def _add_bench_moe(suites) -> None:
    moe = command(suites, "moe", "the fused-MoE layer alone, 1 to 4096 tokens, beside PyTorch and a dense GEMM")
    moe.add_argument("--model-config", action="append", metavar="NAME",
                     help=f"MoE layer shapes (repeatable; default: all of {', '.join(_moe_shapes())})")
    moe.add_argument("--tokens", type=int, nargs="+", default=None, metavar="N",
                     help="token counts (default: 1, 2, 4 .. 4096)")
    moe.add_argument("--dtype", choices=KERNEL_DTYPES, default="bfloat16", help="default: %(default)s")
    moe.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and PNG (default: %(default)s)")
    moe.set_defaults(run=_run_bench_moe)


def _run_bench_moe(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.tokens and min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    import torch

    from tritium.bench.moe import run_moe_bench

    try:
        run_moe_bench(args.model_config, args.tokens, getattr(torch, args.dtype), args.out)
    except ValueError as exc:
        parser.error(str(exc))


def add_tune(commands) -> None:
    tune = command(commands, "tune", "tune a kernel (attention, or the fused MoE) for this GPU and cache the winning "
                    "configs")
    tune.add_argument("--op", choices=("attention", "moe"), default="attention",
                      help="the kernel to tune (default: %(default)s)")
    tune.add_argument("--scenario", action="append", metavar="TEXT",
                      help="attention: tune only scenarios whose name contains TEXT (repeatable; default: all)")
    tune.add_argument("--page-size", type=int, default=16, metavar="N",
                      help="attention: KV-cache page size in tokens (default: %(default)s)")
    tune.add_argument("--model-config", action="append", metavar="NAME",
                      help="moe: tune only these layer shapes (repeatable; default: all of "
                      f"{', '.join(_moe_shapes())})")
    tune.add_argument("--tokens", type=int, nargs="+", default=None, metavar="N",
                      help="moe: token counts to tune (default: 1, 2, 4 .. 4096)")
    tune.add_argument("--dtype", choices=KERNEL_DTYPES, default="bfloat16", help="default: %(default)s")
    tune.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto",
                      help="attention: the K/V pages' dtype, auto (--dtype) or fp8 (e4m3; the engine's "
                      "--kv-cache-dtype fp8 runs those classes) (default: %(default)s)")
    tune.add_argument("--cache", type=Path, default=None, metavar="FILE",
                      help="JSON file to merge the winners into (default: the user cache the kernel reads, "
                      "under ~/.cache/tritium or $TRITIUM_CACHE_DIR)")
    tune.set_defaults(run=_run_tune)


def _run_tune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.op == "moe" and args.scenario:
        parser.error("--scenario selects attention scenarios; with --op moe use --model-config and --tokens")
    if args.op == "attention" and (args.model_config or args.tokens):
        parser.error("--model-config and --tokens go with --op moe")
    if args.op == "moe" and args.kv_cache_dtype != "auto":
        parser.error("--kv-cache-dtype goes with --op attention")
    if args.tokens and min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    import torch

    from tritium.bench.tune import tune, tune_moe

    try:
        if args.op == "moe":
            tune_moe(args.model_config, args.tokens, getattr(torch, args.dtype), args.cache)
        else:
            tune(args.scenario, args.page_size, getattr(torch, args.dtype), args.cache,
                 kv_fp8=args.kv_cache_dtype != "auto")
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"tritium tune: {exc}\n")


def _moe_shapes() -> list[str]:
    from tritium.models.shapes import MODEL_SHAPES

    return [name for name, fields in MODEL_SHAPES.items() if "num_experts_per_tok" in fields]
