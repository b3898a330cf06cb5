"""`tritium bench serve` against a real `tritium serve` on loopback (the small default model, CPU)."""

import json

import pytest

from tests.serving import running_server
from tritium.bench.serve import load_prompts
from tritium.cli import main


def test_bench_serve_against_tritium_serve(tmp_path, capsys):
    with running_server() as (url, engine):
        assert main(["bench", "serve", "--url", url, "--num-prompts", "6", "--request-rate", "50",
                     "--input-len", "5", "20", "--output-len", "3", "9", "--out", str(tmp_path)]) == 0
        idle = engine.engine.pages.num_free == engine.engine.pages.num_pages
    printed = capsys.readouterr().out
    assert "6 of 6 requests completed" in printed
    (report_path,) = tmp_path.glob("serve-*.json")
    assert report_path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(report_path.read_text())
    assert report["completed"] == 6 and report["failed"] == 0
    wanted = [n for _, n in load_prompts(None, 6, (5, 20), (3, 9), 0)]
    assert [r["output_tokens"] for r in report["requests"]] == wanted  # ignore_eos: exactly max_tokens each
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "latency_ms"):
        p = report[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], key
    assert report["ttft_ms"]["p50"] <= report["latency_ms"]["p50"]
    assert idle


def test_bench_serve_reports_failures(tmp_path, capsys):
    with running_server(api_key="secret") as (url, _):
        assert main(["bench", "serve", "--url", url, "--model", "x", "--num-prompts", "2", "--input-len", "3", "4",
                     "--output-len", "2", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "0 of 2 requests completed" in printed and "HTTP 401" in printed


def test_prompts_file_and_errors(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a b"}\n{"prompt": "c"}\n')
    got = load_prompts(src, 5, (1, 1), (2, 4), 0)
    assert [p for p, _ in got] == ["a b", "c", "a b", "c", "a b"] and all(2 <= n <= 4 for _, n in got)
    src.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: each line must be"):
        load_prompts(src, 1, (1, 1), (1, 1), 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--url", "http://127.0.0.1:9", "--output-len", "5", "2"])
    assert exit_info.value.code == 2 and "--output-len needs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--url", "http://127.0.0.1:9", "--num-prompts", "1"])  # nothing listens there
    assert exit_info.value.code == 2 and "tritium bench serve:" in capsys.readouterr().err
