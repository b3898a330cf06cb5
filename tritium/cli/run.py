"""`tritium generate` and `tritium serve`: their options and the calls into generate.py and the server."""

import argparse
import sys
from pathlib import Path

from tritium.cli.options import command, engine_options, model_and_config, model_options, sampling_options


def add_generate(commands) -> None:
    gen = command(commands, "generate", "generate text: prompts streamed to the terminal, or JSONL in and out")
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
    model_options(gen)
    sampling_options(gen)
    engine_options(gen)
    gen.set_defaults(run=_run_generate)


def _run_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tritium.engine.errors import EngineDeadError
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
        model, config = model_and_config(parser, args)
        run_generate(model, config, sampling, args.prompts, items, args.output, args.chat)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tritium generate: {exc}\n")
    except EngineDeadError as exc:  # a tensor-parallel rank died, or the device failed
        parser.exit(1, f"\ntritium generate: {exc}\n")


def add_serve(commands) -> None:
    serve = command(commands, "serve", "an OpenAI-compatible HTTP server (completions, chat, streaming)")
    model_options(serve, positional=True)
    serve.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the model's name in the API (default: the Hub id as given, the folder's name, or "
                       "the --model-config name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require Authorization: Bearer KEY on every /v1 request (default: none)")
    serve.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="SECONDS",
                       help="close a keep-alive connection idle this long between requests (default: %(default)s)")
    serve.add_argument("--timeout-header", type=float, default=10.0, metavar="SECONDS",
                       help="close a connection whose request headers are not all in this long after it opened or "
                       "its last answer; a body must then arrive within as long, else 408 (default: %(default)s)")
    serve.add_argument("--max-connections", type=int, default=2048, metavar="N",
                       help="open connections at most; one more is answered 503 and closed (default: %(default)s)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM or SIGINT, let requests in flight run this long, then end them with an "
                       "error (default: %(default)s)")
    serve.add_argument("--disable-log-requests", action="store_true",
                       help="no log line per finished request (default: off)")
    engine_options(serve)
    serve.set_defaults(run=_run_serve)


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from tritium.server.config import ServerConfig
    from tritium.server.serve import run_server

    try:
        server = ServerConfig(args.host, args.port, args.api_key, args.timeout_keep_alive, args.timeout_header,
                              args.max_connections, args.shutdown_timeout, not args.disable_log_requests)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        model, config = model_and_config(parser, args)
        code = run_server(model, server, config, args.served_model_name or args.model_config)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tritium serve: {exc}\n")
    except KeyboardInterrupt:  # Ctrl-C while the model loads: nothing was served yet
        parser.exit(0, "tritium serve: interrupted\n")
    if code:  # the engine died while serving
        sys.exit(code)
