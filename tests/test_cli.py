"""The `tritium` command (tritium/cli/) on the CPU: its options (vLLM's names, help with defaults, what reaches
EngineConfig), the bench commands, and the bench report's table (tritium/bench/kernels.py)."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from tritium import default_model_path
from tritium.bench.kernels import format_table
from tritium.bench.scenarios import load_scenarios
from tritium.cli import build_parser, main
from tritium.engine.config import EngineConfig
from tritium.models.config import ModelConfig

NOTICE = "No CUDA device: running the shrunk suite through Triton's interpreter on the CPU."

# With a GPU these commands would benchmark and tune for real (minutes); here they are checked on the CPU.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (interpreter) behaviour")


@cpu_only
def test_bench_kernels_quick_on_cpu(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", "kernels", "--quick", "--scenario", "decode b1 ", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert NOTICE in printed
    assert "decode b1 ctx8k" in printed and "decode b16" not in printed
    assert "not run: fa3 (needs CUDA)" in printed

    jsons, pngs = sorted(out.glob("*.json")), sorted(out.glob("*.png"))
    assert len(jsons) == 1 and len(pngs) == 1
    assert jsons[0].stem == pngs[0].stem
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out / jsons[0].stem}.json" in printed

    report = json.loads(jsons[0].read_text())
    env = report["environment"]
    for key in ("card", "torch", "triton", "date", "commit"):
        assert isinstance(env[key], str) and env[key], key
    assert env["card"].startswith("CPU")
    assert env["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", env["date"])
    assert report["interpreted"] is True and report["quick"] is True and report["page_size"] == 16
    assert report["dtype"] == "float16"  # bf16 is swapped for fp16 under the interpreter
    assert list(report["peers"]) == ["tritium"]

    (row,) = report["scenarios"]
    assert row["name"] == "decode b1 ctx8k"
    small = load_scenarios()[0].shrunk()
    assert row["flops"] == small.flops() and row["bytes"] == small.bytes()
    assert row["errors"] == {}
    assert row["ms"]["tritium"] > 0
    assert 0 <= row["rel_err"]["tritium"] < 1e-2


@cpu_only
def test_bench_kernels_fp8_peers_on_cpu(tmp_path, capsys):
    """Tritium's fp8 variants run when named, against Tritium in the batch's dtype: within the fp8 bound of the
    unrounded batch's reference, with their speed-up over it printed."""
    out = tmp_path / "results"
    assert main(["bench", "kernels", "--quick", "--scenario", "decode b1 ", "--peer", "tritium_fp8kv", "--peer",
                 "tritium_fp8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(next(out.glob("*.json")).read_text())
    assert list(report["peers"]) == ["tritium", "tritium_fp8kv", "tritium_fp8"]
    assert report["fp8_peers"] == ["tritium_fp8kv", "tritium_fp8"]
    (row,) = report["scenarios"]
    assert row["errors"] == {}
    for peer in ("tritium_fp8kv", "tritium_fp8"):
        assert row["ms"][peer] > 0 and 1e-3 < row["rel_err"][peer] < 8e-2  # fp8's rounding shows, within bounds
    assert "tritium_fp8 ms" in printed
    assert re.search(r"decode b1 ctx8k .* \d+\.\d{4} \(\d+\.\d\dx\) +\d+\.\d{4} \(\d+\.\d\dx\)", printed)


def test_bench_kernels_unknown_scenario(tmp_path, capsys):
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kernels", "--scenario", "no such scenario", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no scenario matches" in err and "no such scenario" in err
    for sc in load_scenarios():
        assert sc.name in err, f"the error does not list {sc.name!r}"
    assert not out.exists()


@pytest.mark.parametrize("page_size", ["0", "-16"])
def test_bench_kernels_page_size_must_be_positive(tmp_path, capsys, page_size):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kernels", "--page-size", page_size, "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "--page-size must be a positive number of tokens" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@cpu_only
def test_tune_needs_a_gpu(tmp_path, capsys):
    cache = tmp_path / "cache.json"
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--scenario", "decode b1 ", "--cache", str(cache)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "tritium tune" in err and "needs a GPU" in err
    assert not cache.exists()


def test_no_command_is_a_parser_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


# --- format_table on a hand-made report ---


def report() -> dict:
    return {
        "environment": {"card": "Test Card", "torch": "9.9", "triton": "8.8", "date": "2030-01-02 03:04 UTC",
                        "commit": "abc1234"},
        "page_size": 16, "dtype": "bfloat16", "eager": False,
        "attention_table": "sibling's tuned table (some:key, 3 classes)",
        "ceilings": {"bf16_gemm_tflops": 800.0, "copy_tb_per_s": 3.0},
        "peers": {"tritium": "ours", "fa3": "theirs", "vllm_triton": "vLLM"},
        "peers_missing": ["sdpa_flash (needs CUDA)", "torch_varlen (ImportError: nope)"],
        "scenarios": [
            {"name": "decode fast", "flops": 4e9, "bytes": 2e9, "floor_ms": 0.5,
             "ms": {"tritium": 1.0, "fa3": 2.0, "vllm_triton": 1.5},
             "timing": {"tritium": "graph", "fa3": "graph", "vllm_triton": "eager"},
             "rel_err": {"tritium": 1e-3, "fa3": 1e-3, "vllm_triton": 0.5}, "errors": {}},
            {"name": "prefill wrong", "flops": 1e12, "bytes": 1e9,
             "ms": {"tritium": 4.0, "fa3": 2.0},
             "timing": {"tritium": "graph", "fa3": "graph"},
             "rel_err": {"tritium": 0.03, "fa3": 1e-3}, "errors": {"vllm_triton": "RuntimeError: boom"}},
            {"name": "tritium failed", "flops": 1e9, "bytes": 1e9, "ms": {"fa3": 1.0}, "timing": {"fa3": "graph"},
             "rel_err": {"fa3": 1e-3}, "errors": {"tritium": "ValueError: bad"}},
        ],
    }


def rows_by_name(text: str) -> dict[str, list[str]]:
    return {line.split("  ")[0].strip(): line.split() for line in text.splitlines()
            if line.startswith(("decode fast", "prefill wrong", "tritium failed"))}


def test_format_table():
    text = format_table(report(), bound=2e-2)
    lines = text.splitlines()
    assert lines[0] == "Test Card | torch 9.9 | triton 8.8 | bfloat16 | page 16 | 2030-01-02 03:04 UTC | commit abc1234"
    assert "ceilings: bf16 GEMM 800 TFLOP/s, copy 3.00 TB/s" in text
    assert "tritium's configs: sibling's tuned table (some:key, 3 classes)" in text
    header = next(line for line in lines if line.startswith("scenario"))
    assert header.split() == ["scenario", "tritium", "ms", "TFLOP/s", "TB/s", "%", "floor", "vs", "fa3",
                              "fa3", "ms", "vllm_triton", "ms"]

    rows = rows_by_name(text)
    assert set(rows) == {"decode fast", "prefill wrong", "tritium failed"}
    # decode fast: tritium 1 ms, fa3 2 ms -> 2.00x; 4e9 flops in 1 ms = 4 TFLOP/s; 2e9 bytes = 2 TB/s;
    # floor 0.5 ms = 50%; vllm_triton's output is off (0.5 > bound): marked.
    assert rows["decode fast"][2:] == ["1.0000", "4", "2.00", "50%", "2.00x", "2.0000", "1.5000!"]
    # prefill wrong: tritium off the reference (0.03 > 0.02) is marked, 0.50x fa3, no floor; vllm failed: x.
    assert rows["prefill wrong"][2:] == ["4.0000!", "250", "0.25", "-", "0.50x", "2.0000", "x"]
    # tritium failed: no tritium numbers at all.
    assert rows["tritium failed"][2:] == ["-", "-", "-", "-", "-", "1.0000", "-"]

    assert "timed eagerly (not capturable in a CUDA graph): vllm_triton" in text
    assert "not run: sdpa_flash (needs CUDA); torch_varlen (ImportError: nope)" in text
    assert "error: prefill wrong: vllm_triton: RuntimeError: boom" in text
    assert "error: tritium failed: tritium: ValueError: bad" in text


def test_format_table_bound_decides_the_mark():
    strict = rows_by_name(format_table(report(), bound=1e-4))
    assert strict["decode fast"][2] == "1.0000!" and strict["decode fast"][7] == "2.0000!"
    loose = rows_by_name(format_table(report(), bound=1.0))
    assert not any("!" in cell for row in loose.values() for cell in row)


def test_format_table_without_ceilings_or_missing_peers():
    r = report()
    r["ceilings"], r["peers_missing"] = None, []
    text = format_table(r, bound=2e-2)
    assert "ceilings" not in text and "not run" not in text
    assert "decode fast" in text


def test_format_table_marks_nan_error():
    """A peer whose output is NaN gets rel_err NaN (run_kernel_bench computes ||got - ref|| / ||ref||); its check
    failed, so its time must carry the '!' like any other error above the bound."""
    r = report()
    r["scenarios"][0]["rel_err"]["fa3"] = float("nan")
    rows = rows_by_name(format_table(r, bound=2e-2))
    assert rows["decode fast"][7] == "2.0000!", "a NaN relative error is not marked as a failed check"


# --- the parser: vLLM's names, help with defaults, one set of model and engine options ---


def parsers(parser=None, path="tritium"):
    """(command path, parser) of every command and subcommand."""
    parser = parser or build_parser()
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def options(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def test_every_option_has_help_that_gives_its_default():
    for path, parser in parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{path} {action.option_strings or action.metavar}"
            if action.required and action.option_strings:  # (argparse calls a PROMPT... positional required too)
                assert "required" in action.help, name
                continue
            assert action.help and "default" in action.help, f"{name}: the help gives no default"
            shown = action.help % {"default": action.default}
            if isinstance(action.default, (int, float, str, Path)) and not isinstance(action.default, bool):
                assert str(action.default) in shown, f"{name}: help {shown!r} lacks {action.default}"
            if isinstance(action.default, tuple):
                assert " ".join(map(str, action.default)) in shown, name


def test_generate_serve_and_bench_throughput_share_the_model_and_engine_options():
    commands = dict(parsers())
    engine = {s for s, a in options(commands["tritium serve"]).items() if a.container.title == "engine options"}
    assert {"--dtype", "--max-model-len", "--block-size", "--max-num-batched-tokens", "--max-num-seqs",
            "--gpu-memory-utilization", "--enable-prefix-caching", "--no-enable-prefix-caching", "--enforce-eager",
            "--seed"} <= engine
    shared = engine | {"--model", "--revision", "--tokenizer", "--model-config"}
    for command in ("generate", "serve", "bench throughput"):
        assert shared <= set(options(commands[f"tritium {command}"])), command
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for s in engine:  # each engine option lands in the EngineConfig field of its name
        assert options(commands["tritium serve"])[s].dest in fields, s


def serve_args(monkeypatch, argv: list[str]) -> dict:
    """What `tritium serve ARGV` would start the server with (run_server is replaced)."""
    import tritium.server.serve

    seen = {}

    def run_server(model, server, config, name):
        seen.update(model=model, host=server.host, port=server.port, config=config, name=name)
        return 0

    monkeypatch.setattr(tritium.server.serve, "run_server", run_server)
    assert main(["serve", *argv]) == 0
    return seen


def test_serve_takes_the_model_as_vllm_does(monkeypatch, capsys):
    from tritium.server.serve import served_name

    assert serve_args(monkeypatch, ["org/model"])["model"] == "org/model"
    assert served_name("org/model") == "org/model" and served_name(default_model_path()) == "default_model"
    got = serve_args(monkeypatch, ["--model", "org/model", "--served-model-name", "mine", "--revision", "v2"])
    assert got["model"] == "org/model" and got["name"] == "mine" and got["config"].revision == "v2"
    got = serve_args(monkeypatch, [])
    assert got["model"] == default_model_path() and "demo model" in capsys.readouterr().err
    shape = serve_args(monkeypatch, ["--model-config", "qwen3-0.6b"])
    assert isinstance(shape["model"], ModelConfig) and shape["name"] == "qwen3-0.6b"
    assert shape["config"].tokenizer == default_model_path()


def test_vllm_engine_flags_reach_the_engine_config(monkeypatch):
    default = serve_args(monkeypatch, ["m/x"])["config"]
    assert default == EngineConfig()
    config = serve_args(monkeypatch, ["m/x", "--no-enable-prefix-caching", "--enforce-eager", "--seed", "3",
                                      "--block-size", "32", "--max-model-len", "512", "--dtype", "float16",
                                      "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                                      "--gpu-memory-utilization", "0.5", "--tokenizer", "t/k"])["config"]
    assert config == EngineConfig(enable_prefix_caching=False, enforce_eager=True, seed=3, block_size=32,
                                  max_model_len=512, dtype="float16", max_num_seqs=8, max_num_batched_tokens=64,
                                  gpu_memory_utilization=0.5, tokenizer="t/k")
    assert serve_args(monkeypatch, ["m/x", "--enable-prefix-caching"])["config"].enable_prefix_caching


@pytest.mark.parametrize("argv", [["serve", "--mod", "x"], ["serve", "--model-c", "qwen3-0.6b"],
                                  ["generate", "--max-tok", "3", "hi"], ["serve", "--no-prefix-caching"]])
def test_abbreviations_and_old_spellings_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
