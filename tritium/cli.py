"""The `tritium` command: argument parsing only; the work happens in the layers below.

Option names are vLLM's where the option is the same. The engine options' destinations are EngineConfig's field
names, so `_engine_config` passes them on without a table of its own.
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from tritium.engine.config import DTYPES as ENGINE_DTYPES
from tritium.engine.config import EngineConfig

KERNEL_DTYPES = ("bfloat16", "float16")
RESULTS = Path("benchmarks/results")
DEFAULT_MODEL_NOTE = ("Using Tritium's built-in demo model (7M parameters trained on Python's own documentation; "
                      "see tritium/default_model/README.md). Give a model folder or Hugging Face id (--model) "
                      "for another.")
_ENGINE = EngineConfig()  # the defaults the help text shows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The engine's start-up notes (which tuned table the kernel runs with, the auto-tune) go to standard error.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tritium").setLevel(logging.INFO)
    args.run(args.command_parser, args)  # errors then show the command's own usage
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: `tritium generate | serve | bench kernels | bench throughput | bench serve | tune`."""
    parser = _parser(prog="tritium", description="LLM inference around one unified Triton kernel.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(commands)
    _add_serve(commands)
    bench = commands.add_parser("bench", help="benchmarks: tables, JSON and PNG plots, peers timed in the same run",
                                description="Benchmarks: tables, JSON and PNG plots, peers timed in the same run.",
                                allow_abbrev=False)
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    _add_bench_kernels(suites)
    _add_bench_throughput(suites)
    _add_bench_serve(suites)
    _add_bench_moe(suites)
    _add_tune(commands)
    return parser


def _parser(**kwargs) -> argparse.ArgumentParser:
    # allow_abbrev=False: argparse would otherwise take `--model` for `--model-config` where only the latter exists.
    return argparse.ArgumentParser(allow_abbrev=False, **kwargs)


def _command(commands, name: str, help_: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                                  allow_abbrev=False)
    command.set_defaults(command_parser=command)
    return command


# --- the options generate, serve and bench throughput share ---


def _model_options(parser: argparse.ArgumentParser, positional: bool) -> None:
    """Which model: a folder or Hugging Face id (as `MODEL` too where `positional`), or random weights in a shape."""
    if positional:
        parser.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                            help="same as --model (default: none)")
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="Hugging Face model folder or Hub id (org/name): the local cache first, then a download "
                        "unless HF_HUB_OFFLINE=1 (default: Tritium's demo model)")
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="branch, tag or commit of a Hub model (default: main)")
    parser.add_argument("--tokenizer", default=None, metavar="MODEL",
                        help="take the tokenizer from this folder or Hub id (default: the model's; with "
                        "--model-config, the demo model's)")
    parser.add_argument("--model-config", default=None, metavar="NAME",
                        help="random weights in a real model's shape instead of a model, for benchmarks: "
                        f"{', '.join(_model_shapes())} (default: none)")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    """EngineConfig's settings; each option's destination is the field's name."""
    group = parser.add_argument_group("engine options")
    add = group.add_argument
    add("--dtype", choices=ENGINE_DTYPES, default=_ENGINE.dtype,
        help="weights and activations; auto: bfloat16 on a GPU, float32 on the CPU (default: %(default)s)")
    add("--max-model-len", type=int, default=None, metavar="N",
        help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
    add("--block-size", type=int, default=_ENGINE.block_size, metavar="N",
        help="tokens per KV-cache page (default: %(default)s)")
    add("--max-num-batched-tokens", type=int, default=_ENGINE.max_num_batched_tokens, metavar="N",
        help="token budget of one engine step (default: %(default)s)")
    add("--max-num-seqs", type=int, default=_ENGINE.max_num_seqs, metavar="N",
        help="sequences in one engine step (default: %(default)s)")
    add("--gpu-memory-utilization", type=float, default=_ENGINE.gpu_memory_utilization, metavar="F",
        help="share of the GPU's free memory the KV cache may take (default: %(default)s)")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=_ENGINE.enable_prefix_caching,
        help="share the KV pages of identical prompt prefixes (default: on)")
    add("--enforce-eager", action="store_true",
        help="run decode steps eagerly, not as CUDA graphs (default: off)")
    add("--auto-tune", action=argparse.BooleanOptionalAction, default=_ENGINE.auto_tune,
        help="at start on a GPU, tune the attention classes its tuned table lacks; TRITIUM_AUTO_TUNE=0 turns it off "
        "too (default: on)")
    add("--seed", type=int, default=None,
        help="seed the random draws of requests that carry no seed of their own, so a run repeats "
        "(default: none, each run differs)")


def _engine_config(args: argparse.Namespace, **extra) -> EngineConfig:
    """The EngineConfig the options on the command line ask for (plus `extra` fields)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**given, **extra})


def _model_and_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(a model folder or Hub id, or a ModelConfig of random weights; its EngineConfig). Without a model, the demo
    model (said on standard error)."""
    from tritium import default_model_path
    from tritium.models.shapes import shape_config

    model = args.model
    if getattr(args, "model_positional", None) is not None:
        if model is not None:
            parser.error("give the model as MODEL or as --model, not both")
        model = args.model_positional
    if model is not None and args.model_config is not None:
        parser.error("give MODEL or --model-config NAME, not both")
    if args.model_config is not None:
        tokenizer = args.tokenizer
        if tokenizer is None and not getattr(args, "skip_tokenizer_init", False):
            tokenizer = default_model_path()
        return shape_config(args.model_config), _engine_config(args, tokenizer=tokenizer)
    if model is None:
        print(DEFAULT_MODEL_NOTE, file=sys.stderr)
        model = default_model_path()
    return model, _engine_config(args)


# --- generate ---


def _add_generate(commands) -> None:
    gen = _command(commands, "generate", "generate text: prompts streamed to the terminal, or JSONL in and out")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT",
                     help="prompts, each streamed in turn (default: none; then give --input)")
    gen.add_argument("--input", type=Path, default=None, metavar="FILE",
                     help="JSONL lines of {prompt | prompt_token_ids | messages} and optional sampling fields "
                     "(default: none)")
    gen.add_argument("--output", type=Path, default=None, metavar="FILE",
                     help="JSONL results of --input (default: standard output)")
    gen.add_argument("--chat", action="store_true",
                     help="send each PROMPT as a user message through the chat template (default: off)")
    gen.add_argument("--skip-tokenizer-init", action="store_true",
                     help="load no tokenizer: --input lines hold prompt_token_ids, results token ids (default: off)")
    _model_options(gen, positional=False)
    _sampling_options(gen)
    _engine_options(gen)
    gen.set_defaults(run=_run_generate)


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    # Unset options take the model's generation_config.json defaults, then SamplingParams' own.
    group = parser.add_argument_group("sampling options (JSONL lines may set their own)")
    add = group.add_argument
    add("--max-tokens", type=int, default=None, metavar="N",
        help="tokens to generate at most (default: the model's max_new_tokens, else 64)")
    add("--temperature", type=float, default=None, metavar="T",
        help="0 is greedy (default: the model's, else 1)")
    add("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens; 0 or -1: all "
        "(default: the model's, else all)")
    add("--top-p", type=float, default=None, metavar="P",
        help="keep the most likely tokens up to this mass (default: the model's, else 1)")
    add("--min-p", type=float, default=None, metavar="P",
        help="drop tokens below P times the most likely one's probability (default: the model's, else 0)")
    add("--n", type=int, default=1, metavar="N", help="samples per prompt (default: %(default)s)")
    add("--stop", action="append", default=[], metavar="TEXT",
        help="end a sample before this text (repeatable; default: none)")
    add("--ignore-eos", action="store_true", help="go on past the end-of-sequence token (default: off)")


def _run_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tritium.engine.sampling_params import SamplingParams
    from tritium.generate import read_prompts, run_generate

    if bool(args.prompts) == (args.input is not None):
        parser.error("give PROMPT arguments or --input FILE (one of the two)")
    if args.output is not None and args.input is None:
        parser.error("--output goes with --input (prompts on the command line stream to the terminal)")
    if args.skip_tokenizer_init and args.input is None:
        parser.error("--skip-tokenizer-init goes with --input (prompts on the command line are text)")
    sampling = {name: value for name in ("temperature", "top_k", "top_p", "min_p", "max_tokens")
                if (value := getattr(args, name)) is not None}
    sampling.update(n=args.n, stop=args.stop, ignore_eos=args.ignore_eos)
    try:
        SamplingParams(**sampling)  # bad values, and a bad input file, are named before the model loads
        items = None if args.input is None else read_prompts(args.input, sampling, args.skip_tokenizer_init)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tritium generate: {exc}\n")
    try:
        model, config = _model_and_config(parser, args)
        run_generate(model, config, sampling, args.prompts, items, args.output, args.chat)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tritium generate: {exc}\n")


# --- serve ---


def _add_serve(commands) -> None:
    serve = _command(commands, "serve", "an OpenAI-compatible HTTP server (completions, chat, streaming)")
    _model_options(serve, positional=True)
    serve.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the model's name in the API (default: the Hub id as given, the folder's name, or "
                       "the --model-config name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require Authorization: Bearer KEY on every /v1 request (default: none)")
    _engine_options(serve)
    serve.set_defaults(run=_run_serve)


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tritium.server.serve import run_server

    try:
        model, config = _model_and_config(parser, args)
        name = args.served_model_name or args.model_config
        run_server(model, args.host, args.port, args.api_key, config, name)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tritium serve: {exc}\n")


# --- bench ---


def _add_bench_kernels(suites) -> None:
    kernels = _command(suites, "kernels", "the attention scenario suite against FlashAttention-3 and others")
    kernels.add_argument("--quick", action="store_true",
                         help="shrunk scenarios (always so without a GPU: kernels then run in Triton's interpreter; "
                         "default: off)")
    kernels.add_argument("--page-size", type=int, default=16, metavar="N",
                         help="KV-cache page size in tokens (default: %(default)s)")
    kernels.add_argument("--dtype", choices=KERNEL_DTYPES, default="bfloat16", help="default: %(default)s")
    kernels.add_argument("--scenario", action="append", metavar="TEXT",
                         help="run only scenarios whose name contains TEXT (repeatable; default: all)")
    kernels.add_argument("--peer", action="append", metavar="NAME",
                         help="time only these peers (repeatable; default: every peer that imports)")
    kernels.add_argument("--eager", action="store_true",
                         help="time each call as made (host cost included) instead of CUDA-graph replays "
                         "(default: off)")
    kernels.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and PNG (default: %(default)s)")
    kernels.set_defaults(run=_run_bench_kernels)


def _run_bench_kernels(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


def _add_bench_throughput(suites) -> None:
    throughput = _command(suites, "throughput", "engine generation speed on random prompts, beside transformers")
    _model_options(throughput, positional=False)
    throughput.add_argument("--num-prompts", type=int, default=256, metavar="N",
                            help="requests in the batch (default: %(default)s)")
    _length_options(throughput, "token")
    throughput.add_argument("--single", action="store_true",
                            help="one stream (latency mode) instead of the batch (default: off)")
    throughput.add_argument("--hf-prompts", type=int, default=32, metavar="N",
                            help="requests transformers' generate runs as the peer; 0: no peer (default: %(default)s)")
    throughput.add_argument("--out", type=Path, default=RESULTS,
                            help="folder for JSON and PNG (default: %(default)s)")
    _engine_options(throughput)  # its --seed also seeds the random prompts
    throughput.set_defaults(run=_run_bench_throughput)


def _length_options(parser: argparse.ArgumentParser, unit: str) -> None:
    for name in ("input", "output"):
        parser.add_argument(f"--{name}-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"),
                            help=f"random {name} lengths in {unit}s, uniform in [MIN, MAX] (default: 100 1024)")


def _check_lengths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")


def _run_bench_throughput(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tritium.bench.throughput import Workload, run_throughput_bench

    if (args.model is None) == (args.model_config is None):
        parser.error("give one of --model-config NAME or --model MODEL")
    if args.model_config is not None and args.model_config not in _model_shapes():
        parser.error(f"unknown --model-config {args.model_config!r}; known: {', '.join(_model_shapes())}")
    _check_lengths(parser, args)
    if args.num_prompts < 1 or args.hf_prompts < 0:
        parser.error("--num-prompts must be >= 1 and --hf-prompts >= 0")
    seed = 0 if args.seed is None else args.seed
    workload = Workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), seed)
    try:
        run_throughput_bench(args.model or args.model_config, workload, args.single, args.hf_prompts, args.out,
                             _engine_config(args, seed=seed))
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"tritium bench throughput: {exc}\n")


def _add_bench_serve(suites) -> None:
    serve = _command(suites, "serve", "load on any OpenAI-compatible server: throughput, TTFT, TPOT, ITL")
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
    serve.set_defaults(run=_run_bench_serve)


def _run_bench_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


# --- tune ---


def _add_bench_moe(suites) -> None:
    moe = _command(suites, "moe", "the fused-MoE layer alone, 1 to 4096 tokens, beside PyTorch and a dense GEMM")
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


def _add_tune(commands) -> None:
    tune = _command(commands, "tune", "tune a kernel (attention, or the fused MoE) for this GPU and cache the winning "
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
    tune.add_argument("--cache", type=Path, default=None, metavar="FILE",
                      help="JSON file to merge the winners into (default: the user cache the kernel reads, "
                      "under ~/.cache/tritium or $TRITIUM_CACHE_DIR)")
    tune.set_defaults(run=_run_tune)


def _run_tune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.op == "moe" and args.scenario:
        parser.error("--scenario selects attention scenarios; with --op moe use --model-config and --tokens")
    if args.op == "attention" and (args.model_config or args.tokens):
        parser.error("--model-config and --tokens go with --op moe")
    if args.tokens and min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    import torch

    from tritium.bench.tune import tune, tune_moe

    try:
        if args.op == "moe":
            tune_moe(args.model_config, args.tokens, getattr(torch, args.dtype), args.cache)
        else:
            tune(args.scenario, args.page_size, getattr(torch, args.dtype), args.cache)
    except (ValueError, RuntimeError) as exc:
        parser.exit(2, f"tritium tune: {exc}\n")


def _model_shapes() -> list[str]:
    from tritium.models.shapes import MODEL_SHAPES

    return list(MODEL_SHAPES)


def _moe_shapes() -> list[str]:
    from tritium.models.shapes import MODEL_SHAPES

    return [name for name, fields in MODEL_SHAPES.items() if "num_experts_per_tok" in fields]


if __name__ == "__main__":
    sys.exit(main())
