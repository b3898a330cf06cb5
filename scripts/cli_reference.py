"""Write docs/cli.md, the CLI reference, from the `tritium` command's argparse parser (tests/test_docs.py checks that
the file is what this renders):

    python scripts/cli_reference.py            # rewrites docs/cli.md
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tritium.cli import build_parser  # noqa: E402  (after the path: the checkout's tritium, not an installed one)

HEAD = """# CLI reference

Every `tritium` command and option, rendered from the command's own parser by `scripts/cli_reference.py` (a test
checks this page against it). Options are vLLM's where the option is the same; the engine options of `generate`,
`serve` and `bench throughput` are one set, each the `EngineConfig` field of its name (see
[python-api.md](python-api.md)). `tritium COMMAND --help` prints the same.
"""


def render() -> str:
    parts = [HEAD]
    for path, parser in _commands(build_parser(), "tritium"):
        if _subcommands(parser) is not None:
            continue  # `tritium` and `tritium bench` only group the commands below them
        parts.append(_command(path, parser))
    return "\n".join(parts)


def _commands(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    sub = _subcommands(parser)
    for name, child in (sub.choices.items() if sub else ()):
        yield from _commands(child, f"{path} {name}")


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _command(path: str, parser: argparse.ArgumentParser) -> str:
    positionals = [a for a in parser._actions if not a.option_strings]
    usage = " ".join([path, "[OPTIONS]", *(_positional(a) for a in positionals)])
    lines = [f"## {path}", "", parser.description or "", "", f"`{usage}`", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = "arguments" if group.title == "positional arguments" else group.title
        lines += [f"**{title}**", "", "| argument | meaning |", "|---|---|"]
        lines += [f"| {_name(a)} | {_help(a)} |" for a in actions]
        lines.append("")
    return "\n".join(lines)


def _positional(action: argparse.Action) -> str:
    name = action.metavar or action.dest.upper()
    return {"?": f"[{name}]", "*": f"[{name} ...]"}.get(action.nargs, name)


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{_positional(action)}`"
    metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else None)
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.choices is not None:
        metavar = "{" + ",".join(action.choices) + "}"
    return ", ".join(f"`{s} {metavar}`" if metavar else f"`{s}`" for s in action.option_strings)


def _help(action: argparse.Action) -> str:
    return (action.help % {"default": action.default, "prog": "tritium"}).replace("|", "\\|")


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(render())
    print(f"wrote {ROOT / 'docs' / 'cli.md'}")
