"""Every code block of README.md and docs/*.md runs, on the CPU with the demo model; docs/cli.md is what
scripts/cli_reference.py renders from the CLI's parser; the docs cite only files a clone has.

A block runs by its language and by the marker on the line before it, `<!-- doc-test: MODE -->`:
- python: executed in a temporary folder. `server`: against a demo-model server on loopback (served as "demo"),
  which http://127.0.0.1:8000 in the block then points at.
- bash: command by command: `tritium ...` runs in this process (`tritium generate` with 8 new tokens at most;
  `parse`: only parsed by the CLI's parser, for GPU or long-running commands; `tritium serve` is always parsed
  only, the test's server standing in for it), `pip
  install` is checked (extras exist, the index is PyTorch's), `pytest` is checked (markers registered, paths
  exist), `cat > FILE <<'EOF'` writes a file, `cat FILE` prints one, `curl` runs (`server` blocks only),
  `export NAME=VALUE` and `NAME=VALUE command` set the environment.
- json and yaml: parsed. text: shown output, not code.
"""

import importlib.util
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.serving import running_server
from tritium.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- doc-test: (\w+) -->\n)?```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
MODES = {"run", "parse", "server"}
DOC_URL = "http://127.0.0.1:8000"
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
PYPROJECT = (ROOT / "pyproject.toml").read_text()
EXTRAS = re.findall(r"^(\w+) = \[", PYPROJECT.split("[project.optional-dependencies]")[1].split("\n[")[0], re.M)
MARKERS = re.findall(r'"(\w+):', re.search(r"^markers = \[(.*?)\]", PYPROJECT, re.M | re.S).group(1))


def blocks():
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start(2) if m.group(1) is None else m.end(1)) + 1
            yield pytest.param(m.group(1) or "run", m.group(2), m.group(3),
                               id=f"{page.relative_to(ROOT)}:{line}")


@pytest.fixture(scope="module")
def server_url():
    with running_server(name="demo", max_model_len=256) as (url, _):
        yield url


@pytest.mark.parametrize(("mode", "language", "code"), list(blocks()))
def test_code_block_runs(mode, language, code, request, tmp_path, monkeypatch):
    assert mode in MODES, f"unknown doc-test mode {mode!r}"
    assert language in ("python", "bash", "json", "yaml", "text"), f"say the block's language ({language!r})"
    monkeypatch.chdir(tmp_path)
    url = request.getfixturevalue("server_url") if mode == "server" else None
    if language == "python":
        assert mode != "parse", "python blocks run"
        exec(compile(code.replace(DOC_URL, url or DOC_URL), request.node.name, "exec"), {"__name__": "__doc__"})
    elif language == "bash":
        run_bash(code, mode, url, monkeypatch)
    elif language == "json":
        json.loads(code)
    elif language == "yaml":
        yaml.safe_load(code)


def run_bash(code: str, mode: str, url: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = iter(code.replace("\\\n", " ").splitlines())
    for line in lines:
        heredoc = re.fullmatch(r"cat > (\S+) <<'?(\w+)'?", line.strip())
        if heredoc:
            body = []
            for text in lines:
                if text == heredoc.group(2):
                    break
                body.append(text + "\n")
            Path(heredoc.group(1)).write_text("".join(body))
            continue
        if "|" in line:  # a pipeline: curl's output filtered, run by the shell
            assert mode == "server" and line.startswith("curl "), f"pipelines are for curl in server blocks: {line}"
            subprocess.run(line.replace(DOC_URL, url), shell=True, check=True, timeout=60)
            continue
        words = shlex.split(line, comments=True)
        while words:
            command, words = _split_and(words)
            run_command(command, mode, url, monkeypatch)


def _split_and(words: list[str]) -> tuple[list[str], list[str]]:
    if "&&" in words:
        i = words.index("&&")
        return words[:i], words[i + 1:]
    return words, []


def run_command(words: list[str], mode: str, url: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    if words[-1] == "&":
        words = words[:-1]
    name, args = words[0], words[1:]
    if name == "export":
        for assignment in args:
            monkeypatch.setenv(*assignment.split("=", 1))
    elif name == "tritium":
        run_tritium(args, mode)
    elif name == "pip":
        check_pip(args)
    elif name == "pytest":
        check_pytest(args)
    elif name == "cat":
        print(Path(args[0]).read_text())
    elif name == "curl":
        assert mode == "server", "curl runs in server blocks"
        subprocess.run([name, *(a.replace(DOC_URL, url) for a in args)], check=True, timeout=60)
    elif name == "torchrun":  # ranks on several hosts: the module they run must exist
        assert mode == "parse" and importlib.util.find_spec(args[args.index("-m") + 1]) is not None, args
    elif name == "python" and args[0].startswith("scripts/"):
        assert (ROOT / args[0]).is_file() and mode == "parse", args[0]
    else:
        pytest.fail(f"the doc test knows no command {name!r}")


def run_tritium(args: list[str], mode: str) -> None:
    if mode != "run" or args[0] == "serve":
        build_parser().parse_args(args)  # exits 2 on an unknown option
        return
    if args[0] == "generate":
        args = [*args, "--max-tokens", "8"]  # cheap: the last value counts (JSONL lines may still set their own)
    assert main(args) == 0


def check_pip(args: list[str]) -> None:
    assert args[0] == "install", args
    words = iter(args[1:])
    for word in words:
        if word in ("--index-url", "--extra-index-url"):
            assert next(words).startswith(PYTORCH_INDEX), "only PyTorch's own index is named"
        elif word in ("-e", "-q", "--upgrade"):
            continue
        elif word.startswith("."):
            extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", word)
            assert extras, word
            for extra in (extras.group(1) or "").split(",") if extras.group(1) else []:
                assert extra in EXTRAS, f"no extra {extra!r}"
        else:
            assert not word.startswith("-"), f"pip option {word} is not known to the doc test"
            assert Requirement(word).name in ("torch", "triton", "tritium"), word


def check_pytest(args: list[str]) -> None:
    words = iter(args)
    for word in words:
        if word == "-m":
            assert set(re.findall(r"\w+", next(words))) - {"not", "and", "or"} <= set(MARKERS)
        elif word == "-k":
            next(words)
        elif not word.startswith("-"):
            assert (ROOT / word.split("::")[0]).exists(), word


def test_cli_reference_is_rendered_from_the_parser():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text() == module.render(), "run python scripts/cli_reference.py"


def test_docs_cite_only_what_a_clone_has():
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text, f"{page.name} cites ../shared"
        assert not re.search(r"\bbranch `", text), f"{page.name} names a branch"
        for cited in re.findall(r"benchmarks/results/[\w.*{},-]+", text):
            pattern = re.sub(r"\{[^}]*\}", "*", cited).rstrip(".,")  # {a,b} alternatives -> a wildcard
            assert list(ROOT.glob(pattern)), f"{page.name} cites {cited}, which is not in the repository"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links, anchors aside
            assert (page.parent / link).exists(), f"{page.name} links to {link}, which does not exist"
