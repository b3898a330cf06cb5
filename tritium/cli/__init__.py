"""The `tritium` command: argument parsing only; the work happens in the layers below. One module per group of
commands (run.py: generate and serve; bench.py: bench and tune) over the options they share (options.py)."""

import argparse
import logging

from tritium.cli.bench import add_bench, add_tune
from tritium.cli.options import DEFAULT_MODEL_NOTE
from tritium.cli.run import add_generate, add_serve

__all__ = ["DEFAULT_MODEL_NOTE", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The engine's start-up notes (which tuned table the kernel runs with, the auto-tune) go to standard error.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tritium").setLevel(logging.INFO)
    args.run(args.command_parser, args)  # errors then show the command's own usage
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: `tritium generate | serve | bench kernels | bench throughput | bench serve | tune`."""
    # allow_abbrev=False here and on every subcommand: argparse would take `--model` for `--model-config`.
    parser = argparse.ArgumentParser(prog="tritium", description="LLM inference around one unified Triton kernel.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(commands)
    add_serve(commands)
    add_bench(commands)
    add_tune(commands)
    return parser
