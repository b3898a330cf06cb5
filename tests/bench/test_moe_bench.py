"""`tritium bench moe` on the CPU (one small layer through the interpreter) and its table on a hand-made GPU
report; `tritium tune --op moe`'s candidates, compile jobs and argument checks."""

import json

import pytest
import torch

from tritium.bench.moe import format_table, moe_shapes
from tritium.cli import main
from tritium.ops.moe.tuning import candidates, compile_jobs

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (interpreter) behaviour")


@cpu_only
def test_bench_moe_on_cpu(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", "moe", "--tokens", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "through Triton's interpreter" in printed
    (path,) = out.glob("*.json")
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(path.read_text())
    assert report["interpreted"] and report["dtype"] == "float32" and report["ceilings"] is None
    assert [r["tokens"] for r in report["rows"]] == [3]
    for r in report["rows"]:
        assert 1 <= r["active_experts"] <= min(8, 2 * r["tokens"])
        assert r["flops"] == 2 * r["tokens"] * 2 * 3 * 32 * 48
        assert r["bytes"] == (r["active_experts"] * 3 * 32 * 48 + 2 * r["tokens"] * 32) * 4
        assert r["rel_err"] < 1e-4 and set(r["ms"]) == {"tritium", "loop", "dense"}


def test_format_table_shares_and_marks():
    row = {"shape": "mixtral-8x7b", "tokens": 1, "active_experts": 2, "flops": 2e9, "bytes": 1e9, "rel_err": 1e-3,
           "ms": {"tritium": 0.5, "loop": 2.0, "dense": 0.4}, "timing": {"tritium": "graph"},
           "memory_floor_ms": 0.25, "compute_floor_ms": 0.005}
    bad = {**row, "tokens": 2, "rel_err": 0.5, "timing": {"tritium": "eager"}}
    report = {"environment": {"card": "H200", "torch": "2.11", "triton": "3.6", "date": "d", "commit": "c"},
              "dtype": "bfloat16", "ceilings": {"bf16_gemm_tflops": 800.0, "copy_tb_per_s": 4.0}, "rows": [row, bad]}
    lines = format_table(report).splitlines()
    assert "ceilings: bf16 GEMM 800 TFLOP/s, copy 4.00 TB/s" in lines
    first, second = lines[4].split(), lines[5].split()
    assert first[3:8] == ["0.5000", "50%", "1%", "2.0000", "4.0x"] and first[9] == "0.80x"
    assert second[3] == "0.5000!"
    assert lines[-1] == "Tritium timed eagerly (its capture failed): mixtral-8x7b t2"


def test_tune_candidates_follow_rows_per_expert():
    mixtral, qwen = moe_shapes()["mixtral-8x7b"], moe_shapes()["qwen3-30b-a3b"]
    assert {c.block_m for c in candidates(mixtral, 64)} == {16}  # 16 rows per expert
    assert {c.block_m for c in candidates(mixtral, 128)} == {32, 64}
    assert {c.block_m for c in candidates(qwen, 4096)} == {64, 128}  # 256 rows per expert
    for n in (1, 256, 4096):
        for c in candidates(qwen, n):
            c.validate("candidate")


def test_tune_compile_jobs_cover_every_candidate_of_both_gemms_once():
    shapes = list(moe_shapes().values())
    tokens = [1, 64, 4096]
    jobs = compile_jobs(shapes, tokens, torch.bfloat16)
    for shape in shapes:
        wanted = {c for n in tokens for c in candidates(shape, n)}
        for gemm in ("gate_up", "down"):
            got = [c for j in jobs if j.shape == shape and j.gemm == gemm for c in j.configs]
            assert sorted(got, key=repr) == sorted(wanted, key=repr)
    assert all(1 <= len(j.configs) <= 4 for j in jobs)


@cpu_only
@pytest.mark.parametrize(("args", "message"), [
    (["--op", "moe"], "needs a GPU"),
    (["--op", "moe", "--model-config", "gpt-5"], "unknown MoE shape gpt-5"),
    (["--op", "moe", "--scenario", "decode"], "--scenario selects attention scenarios"),
    (["--model-config", "mixtral-8x7b"], "--model-config and --tokens go with --op moe"),
    (["--op", "moe", "--tokens", "0"], "--tokens must be positive"),
])
def test_tune_moe_argument_errors(args, message, tmp_path, capsys):
    cache = tmp_path / "cache.json"
    with pytest.raises(SystemExit) as exc:
        main(["tune", *args, "--cache", str(cache)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not cache.exists()


def test_bench_moe_unknown_shape(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "moe", "--model-config", "llama-3.1-8b", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown MoE shape llama-3.1-8b" in capsys.readouterr().err
