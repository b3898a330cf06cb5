"""The `tritium` command: argument parsing only; the work happens in the layers below."""

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritium.engine.config import EngineConfig

DTYPES = ("bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritium", description="LLM inference around one unified Triton kernel.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text: prompts streamed to the terminal, or JSONL in and out")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts, each streamed in turn")
    gen.add_argument("--model", default=None, metavar="DIR",
                     help="Hugging Face model folder (default: the small model that ships with Tritium)")
    gen.add_argument("--input", type=Path, default=None, help="JSONL of {prompt | prompt_token_ids | messages}")
    gen.add_argument("--output", type=Path, default=None, help="JSONL results (default: standard output)")
    gen.add_argument("--chat", action="store_true", help="send each PROMPT as a user message through the chat template")
    # Unset sampling options take the model's generation_config.json defaults, then SamplingParams' own.
    gen.add_argument("--max-tokens", type=int, default=None, help="default: the model's max_new_tokens, else 64")
    gen.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's, else 1)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--min-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=1, help="samples per prompt (JSONL mode)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    _engine_options(gen)
    gen.add_argument("--skip-tokenizer-init", action="store_true", help="token ids in and out (JSONL mode)")

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    serve.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR",
                       help="Hugging Face model folder (default: the small model that ships with Tritium)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every /v1 request")
    serve.add_argument("--model-config", default=None, metavar="NAME",
                       help="serve random weights in a real model's shape instead of a folder (benchmarks): "
                       + ", ".join(_model_shapes()))
    serve.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="take the tokenizer from this folder (default: the model's; with --model-config, the "
                       "default model's)")
    _engine_options(serve)

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
    kernels.add_argument("--eager", action="store_true",
                         help="time each call as made (host cost included) instead of CUDA-graph replays")
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
    throughput.add_argument("--device", choices=("cuda", "cpu"), default=None,
                            help="cpu runs it without a GPU: a check of the code path, not a measurement")
    _engine_options(throughput)

    serve_bench = suites.add_parser("serve", help="load on any OpenAI-compatible server: throughput, TTFT, TPOT, ITL")
    serve_bench.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    serve_bench.add_argument("--model", default=None, help="model name to ask for (default: the server's first)")
    serve_bench.add_argument("--num-prompts", type=int, default=64)
    serve_bench.add_argument("--request-rate", type=float, default=float("inf"),
                             help="requests per second, Poisson arrivals (default: all at once)")
    serve_bench.add_argument("--prompts", type=Path, default=None, help='JSONL of {"prompt": str} lines')
    serve_bench.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"),
                             help="random prompts' length in words (without --prompts)")
    serve_bench.add_argument("--output-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    serve_bench.add_argument("--api-key", default=None)
    serve_bench.add_argument("--seed", type=int, default=0)
    serve_bench.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")

    moe = suites.add_parser("moe", help="the fused-MoE layer alone, 1 to 4096 tokens, beside PyTorch and a dense GEMM")
    moe.add_argument("--model-config", action="append", metavar="NAME",
                     help="MoE layer shapes (repeatable; default: all of " + ", ".join(_moe_shapes()) + ")")
    moe.add_argument("--tokens", type=int, nargs="+", default=None, metavar="N",
                     help="token counts (default 1, 2, 4 .. 4096)")
    moe.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    moe.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON and PNG")

    tune = commands.add_parser("tune", help="tune a kernel (attention, or the fused MoE) for this GPU and cache the "
                               "winning configs")
    tune.add_argument("--op", choices=("attention", "moe"), default="attention", help="the kernel to tune")
    tune.add_argument("--scenario", action="append", metavar="TEXT",
                      help="attention: tune only matching scenarios (repeatable)")
    tune.add_argument("--page-size", type=int, default=16, help="attention: KV-cache page size in tokens (default 16)")
    tune.add_argument("--model-config", action="append", metavar="NAME",
                      help="moe: tune only these layer shapes (repeatable; default: all of "
                      + ", ".join(_moe_shapes()) + ")")
    tune.add_argument("--tokens", type=int, nargs="+", default=None, metavar="N",
                      help="moe: token counts to tune (default 1, 2, 4 .. 4096)")
    tune.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    tune.add_argument("--cache", type=Path, default=None,
                      help="JSON file to merge the winners into (default: the user cache the kernel reads)")

    args = parser.parse_args(argv)
    # The engine's start-up notes (which tuned table the kernel runs with, the auto-tune) go to standard error.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tritium").setLevel(logging.INFO)
    if args.command == "generate":
        _generate(parser, args)
    elif args.command == "serve":
        _serve(parser, args)
    elif args.command == "bench" and args.suite == "serve":
        _bench_serve(parser, args)
    elif args.command == "tune":
        _tune(parser, args)
    elif args.command == "bench" and args.suite == "moe":
        _bench_moe(parser, args)
    elif args.command == "bench" and args.suite == "kernels":
        if args.page_size < 1:
            parser.error(f"--page-size must be a positive number of tokens, got {args.page_size}")
        import torch

        from tritium.bench.kernels import run_kernel_bench

        peers = args.peer
        if peers and "tritium" not in peers:
            peers = ["tritium", *peers]
        try:
            run_kernel_bench(args.scenario, args.page_size, getattr(torch, args.dtype), args.quick, peers, args.out,
                             args.eager)
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
            run_throughput_bench(args.model or args.model_config, workload, args.single, args.hf_prompts, args.out,
                                 _engine_config(args, device=args.device))
        except (ValueError, RuntimeError) as exc:
            parser.exit(2, f"tritium bench throughput: {exc}\n")
    return 0


def _generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.prompts) == (args.input is not None):
        parser.error("give PROMPT arguments or --input FILE (one of the two)")
    if args.output is not None and args.input is None:
        parser.error("--output goes with --input (prompts on the command line stream to the terminal)")
    from tritium.engine.errors import EngineDeadError
    from tritium.engine.sampling_params import SamplingParams
    from tritium.generate import run_generate

    sampling = {name: value for name in ("temperature", "top_k", "top_p", "min_p", "max_tokens")
                if (value := getattr(args, name)) is not None}
    sampling.update(seed=args.seed, n=args.n, stop=args.stop, ignore_eos=args.ignore_eos)
    try:
        SamplingParams(**sampling)  # bad values are named before the model loads
    except ValueError as exc:
        parser.error(str(exc))
    try:
        config = _engine_config(args, skip_tokenizer_init=args.skip_tokenizer_init)
        run_generate(args.model, args.prompts, args.input, args.output, sampling, config, chat=args.chat)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tritium generate: {exc}\n")
    except EngineDeadError as exc:
        parser.exit(1, f"\ntritium generate: {exc}\n")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16, help="KV-cache page size in tokens")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true", help="run decode steps eagerly, not as CUDA graphs")
    parser.add_argument("--no-auto-tune", action="store_true",
                        help="do not tune, at start, the attention classes this GPU's tuned table lacks "
                        "(TRITIUM_AUTO_TUNE=0 does the same)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                        help="split the model across N GPUs (one process each; on a machine without one, N CPU "
                        "processes)")
    parser.add_argument("--ranks-address", default=None, metavar="HOST:PORT",
                        help="wait here for the ranks torchrun starts on several hosts instead of starting them "
                        "(docs/tensor_parallel.md)")


def _engine_config(args: argparse.Namespace, **extra) -> "EngineConfig":
    """The EngineConfig the engine options (and `extra` fields) on the command line ask for."""
    from tritium.engine.config import EngineConfig

    return EngineConfig(dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
                        auto_tune=not args.no_auto_tune, tensor_parallel_size=args.tensor_parallel_size,
                        ranks_address=args.ranks_address, **extra)


def _bench_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")
    if args.num_prompts < 1 or not args.request_rate > 0:
        parser.error("--num-prompts must be >= 1 and --request-rate > 0")
    import httpx

    from tritium.bench.serve import run_serve_bench

    try:
        run_serve_bench(args.url, args.num_prompts, args.request_rate, args.prompts, tuple(args.input_len),
                        tuple(args.output_len), args.model, args.api_key, args.seed, args.out)
    except (ValueError, OSError, httpx.HTTPError) as exc:
        parser.exit(2, f"tritium bench serve: {exc}\n")


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tritium.generate import DEFAULT_MODEL_NOTE, default_model_dir
    from tritium.models.shapes import shape_config
    from tritium.server.serve import run_server

    if args.model is not None and args.model_config is not None:
        parser.error("give MODEL_DIR or --model-config NAME, not both")
    if args.model is None and args.model_config is None:
        print(DEFAULT_MODEL_NOTE, file=sys.stderr)
    try:
        if args.model_config is not None:
            config = _engine_config(args, tokenizer=args.tokenizer or str(default_model_dir()))
            run_server(shape_config(args.model_config), args.host, args.port, args.api_key, config, args.model_config)
        else:
            run_server(args.model or str(default_model_dir()), args.host, args.port, args.api_key,
                       _engine_config(args, tokenizer=args.tokenizer))
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tritium serve: {exc}\n")


def _tune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.op == "moe" and args.scenario:
        parser.error("--scenario selects attention scenarios; with --op moe use --model-config and --tokens")
    if args.op == "attention" and (args.model_config or args.tokens):
        parser.error("--model-config and --tokens go with --op moe")
    if args.tokens and min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    import torch

    try:
        from tritium.bench.tune import tune as run_tune
        from tritium.bench.tune import tune_moe

        if args.op == "moe":
            tune_moe(args.model_config, args.tokens, getattr(torch, args.dtype), args.cache)
        else:
            run_tune(args.scenario, args.page_size, getattr(torch, args.dtype), args.cache)
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"tritium tune: {exc}\n")


def _bench_moe(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.tokens and min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    import torch

    from tritium.bench.moe import run_moe_bench

    try:
        run_moe_bench(args.model_config, args.tokens, getattr(torch, args.dtype), args.out)
    except ValueError as exc:
        parser.error(str(exc))


def _moe_shapes() -> list[str]:
    from tritium.models.shapes import MODEL_SHAPES

    return [name for name, fields in MODEL_SHAPES.items() if "num_experts_per_tok" in fields]


def _model_shapes() -> list[str]:
    from tritium.models.shapes import MODEL_SHAPES

    return list(MODEL_SHAPES)


if __name__ == "__main__":
    sys.exit(main())
