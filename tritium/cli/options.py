"""The options `generate`, `serve` and `bench throughput` share: which model, and the engine's settings. Names are
vLLM's where the option is the same; each engine option's destination is the EngineConfig field of its name, so
`engine_config` passes them on without a table of its own."""

import argparse
import dataclasses
import sys

from tritium.engine.config import DTYPES, KV_CACHE_DTYPES, EngineConfig
from tritium.models.config import ModelConfig

DEFAULT_MODEL_NOTE = ("Using Tritium's built-in demo model (7M parameters trained on Python's own documentation; "
                      "see tritium/default_model/README.md). Give a model folder or Hugging Face id (--model) "
                      "for another.")
_ENGINE = EngineConfig()  # the defaults the help text shows


def command(commands, name: str, help_: str) -> argparse.ArgumentParser:
    """A subcommand's parser (no abbreviated options: argparse would take `--model` for `--model-config`); its
    errors show its own usage."""
    parser = commands.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                                 allow_abbrev=False)
    parser.set_defaults(command_parser=parser)
    return parser


def model_options(parser: argparse.ArgumentParser, positional: bool = False, demo: bool = True) -> None:
    """Which model: a folder or Hugging Face id (as `MODEL` too where `positional`), or random weights in a shape;
    without either, the demo model where `demo`."""
    if positional:
        parser.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                            help="same as --model (default: none)")
    default = "Tritium's demo model" if demo else "none; give this or --model-config"
    parser.add_argument("--model", default=None, metavar="MODEL",
                        help="Hugging Face model folder or Hub id (org/name): the local cache first, then a download "
                        f"unless HF_HUB_OFFLINE=1 (default: {default})")
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="branch, tag or commit of a Hub model (default: main)")
    parser.add_argument("--tokenizer", default=None, metavar="MODEL",
                        help="take the tokenizer from this folder or Hub id (default: the model's; with "
                        "--model-config, the demo model's)")
    parser.add_argument("--model-config", default=None, metavar="NAME",
                        help="random weights in a real model's shape instead of a model, for benchmarks: "
                        f"{', '.join(model_shapes())} (default: none)")


def engine_options(parser: argparse.ArgumentParser) -> None:
    """EngineConfig's settings; each option's destination is the field's name."""
    group = parser.add_argument_group("engine options")
    add = group.add_argument
    add("--dtype", choices=DTYPES, default=_ENGINE.dtype,
        help="weights and activations; auto: bfloat16 on a GPU, float32 on the CPU (default: %(default)s)")
    add("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=_ENGINE.kv_cache_dtype,
        help="KV pages in the model's dtype (auto) or fp8 e4m3: twice the pages, half the bytes read "
        "(default: %(default)s)")
    add("--calculate-kv-scales", action="store_true",
        help="with an fp8 cache, measure the K/V scales on the first step instead of the checkpoint's (else 1.0) "
        "(default: off)")
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
    add("--tensor-parallel-size", "-tp", type=int, default=_ENGINE.tensor_parallel_size, metavar="N",
        help="split the model across N GPUs, one process each; on a machine without one, N CPU processes "
        "(default: %(default)s)")
    add("--ranks-address", default=None, metavar="HOST:PORT",
        help="wait here for the ranks torchrun starts on several hosts instead of starting them "
        "(docs/tensor_parallel.md; default: none)")


def engine_config(args: argparse.Namespace, **extra) -> EngineConfig:
    """The EngineConfig the options on the command line ask for (plus `extra` fields)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**given, **extra})


def model_and_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      ) -> tuple[str | ModelConfig, EngineConfig]:
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
        return shape_config(args.model_config), engine_config(args, tokenizer=tokenizer)
    if model is None:
        print(DEFAULT_MODEL_NOTE, file=sys.stderr)
        model = default_model_path()
    return model, engine_config(args)


def sampling_options(parser: argparse.ArgumentParser) -> None:
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


def model_shapes() -> list[str]:
    from tritium.models.shapes import MODEL_SHAPES

    return list(MODEL_SHAPES)
