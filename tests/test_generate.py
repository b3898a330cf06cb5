"""`tritium generate` (tritium/generate.py through tritium/cli/) on the default model that ships in the package."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.helpers import assert_greedy_equals_transformers
from tritium import LLM, SamplingParams, default_model_path
from tritium.cli import DEFAULT_MODEL_NOTE, main


@pytest.fixture(scope="module")
def llm():
    return LLM(default_model_path())


def test_default_model_folder_is_complete_and_in_budget():
    folder = Path(default_model_path())
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md", "loss_curve.png"} <= names
    weights = load_file(folder / "model.safetensors")
    assert sum(t.numel() for t in weights.values()) <= 15_000_000
    assert (folder / "model.safetensors").stat().st_size <= 30 * 10**6
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    card = (folder / "README.md").read_text()
    for field in ("parameters", "held_out_perplexity", "seconds", "card: NVIDIA"):
        assert field in card


def test_default_model_greedy_equals_transformers():
    """The shipped trained model is the real-model fixture: Tritium's greedy tokens are transformers' on it."""
    assert_greedy_equals_transformers(Path(default_model_path()), ["The for statement", "A list comprehension",
                                                            "Return the number of", "Exceptions"], max_tokens=24)


def test_prompt_streams_the_same_text_as_generate(capsys):
    # --seed seeds the engine (vLLM's LLM(seed=...)); options not given (top_p here) come from the model's
    # generation_config.json.
    seeded = LLM(seed=5)
    params = seeded.default_sampling_params(temperature=0.8, max_tokens=24)
    assert params.top_p == 0.9
    expected = seeded.generate(["The for statement"], params, use_tqdm=False)[0].outputs[0].text
    assert main(["generate", "The for statement", "--temperature", "0.8", "--seed", "5", "--max-tokens", "24"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "The for statement" + expected + "\n"
    assert DEFAULT_MODEL_NOTE in captured.err


@pytest.mark.parametrize("stop", [["e"], ["in", "s "], ["never there"]])
def test_stream_pieces_join_to_the_final_text(llm, stop):
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=40, stop=stop)
    final = llm.generate(["Exceptions"], params, use_tqdm=False)[0].outputs[0].text
    assert "".join(llm.stream("Exceptions", params)) == final


def test_jsonl_in_and_out(llm, tmp_path, capsys):
    ids = llm.engine.tokenizer.encode("import statement")
    lines = [{"prompt": "The while loop"}, {"prompt_token_ids": ids}, {"messages": [{"role": "user", "content": "hi"}]}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "results.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert main(["generate", "--input", str(src), "--output", str(dst), "--temperature", "0", "--max-tokens", "7",
                 "--ignore-eos"]) == 0
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    greedy = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    expected = llm.generate(["The while loop", {"prompt_token_ids": ids}], greedy, use_tqdm=False)
    expected += llm.chat([{"role": "user", "content": "hi"}], greedy, use_tqdm=False)
    assert [g["index"] for g in got] == [0, 1, 2]
    assert [g["token_ids"] for g in got] == [e.outputs[0].token_ids for e in expected]
    assert [g["text"] for g in got] == [e.outputs[0].text for e in expected]
    assert all(g["finish_reason"] == "length" for g in got)
    assert got[0]["prompt"] == "The while loop" and got[1]["prompt_token_ids"] == ids and "messages" in got[2]


def test_jsonl_lines_carry_their_own_sampling_fields(llm, tmp_path):
    ids = llm.engine.tokenizer.encode("import statement")
    lines = [{"prompt": "The while loop", "max_tokens": 3},
             {"prompt": "Exceptions", "n": 2, "seed": 1, "temperature": 0.9, "max_tokens": 5},
             {"prompt_token_ids": ids, "logprobs": 2, "stop": ["e"], "ignore_eos": False},
             {"prompt": "Pick one:", "structured_outputs": {"choice": ["yes", "no"]}, "ignore_eos": False}]
    src, dst = tmp_path / "in.jsonl", tmp_path / "results.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["generate", "--input", str(src), "--output", str(dst), "--temperature", "0", "--max-tokens", "7",
                 "--ignore-eos"]) == 0
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    # Each line's fields over the command line's (temperature 0, 7 tokens, EOS ignored), over the model's defaults.
    params = [llm.default_sampling_params(temperature=0, max_tokens=3, ignore_eos=True),
              llm.default_sampling_params(temperature=0.9, n=2, seed=1, max_tokens=5, ignore_eos=True),
              llm.default_sampling_params(temperature=0, max_tokens=7, logprobs=2, stop=["e"])]
    expected = llm.generate(["The while loop", "Exceptions", {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert [(g["index"], g["sample"]) for g in got] == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0)]
    assert got[4]["text"] in ("yes", "no") and got.pop()["structured_outputs"] == {"choice": ["yes", "no"]}
    assert [g["token_ids"] for g in got] == [o.token_ids for e in expected for o in e.outputs]
    assert [len(g["token_ids"]) for g in got[:3]] == [3, 5, 5] and got[1]["text"] != got[2]["text"]
    assert "e" not in got[3]["text"] and got[3]["finish_reason"] in ("stop", "length")
    assert [[e["token_id"] for e in pos] for pos in got[3]["top_logprobs"]] == [
        list(pos) for pos in expected[2].outputs[0].logprobs]
    assert got[1]["seed"] == 1 and got[1]["n"] == 2  # the input line's fields come back beside the results


def test_a_results_file_fed_back_keeps_the_new_results(llm, tmp_path):
    src, first, second = tmp_path / "in.jsonl", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    src.write_text(json.dumps({"prompt": "Exceptions"}) + "\n" + json.dumps({"prompt": "The for", "n": 2}) + "\n")
    argv = ["generate", "--temperature", "0", "--max-tokens", "4", "--ignore-eos"]
    assert main([*argv, "--input", str(src), "--output", str(first)]) == 0
    old = [json.loads(line) for line in first.read_text().splitlines()]
    fed = [{**line, "text": "stale", "index": 99, "sample": 7} for line in old]
    first.write_text("".join(json.dumps(line) + "\n" for line in fed))
    assert main([*argv, "--max-tokens", "2", "--input", str(first), "--output", str(second)]) == 0
    new = [json.loads(line) for line in second.read_text().splitlines()]
    # Three lines in (one per sample of the first run), three results out: each line's own index, fresh text.
    assert [(g["index"], g["sample"]) for g in new] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(g["text"] != "stale" and len(g["token_ids"]) == 2 for g in new)


def test_command_line_prompts_with_n_samples(capsys):
    params = SamplingParams(temperature=0.9, top_p=0.9, n=2, max_tokens=8, ignore_eos=True)
    expected = LLM(seed=4).generate("Exceptions", params, use_tqdm=False)[0].outputs
    assert main(["generate", "Exceptions", "--n", "2", "--seed", "4", "--temperature", "0.9", "--max-tokens", "8",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"[sample {o.index}]\nExceptions{o.text}\n" for o in expected)
    assert expected[0].text != expected[1].text


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the run's processes through /proc")
def test_generate_on_two_ranks_prints_one_ranks_text_and_leaves_no_process(llm):
    """`tritium generate -tp 2` as a user runs it (its own session): one rank's greedy text, exit code 0, and no
    process of its session left once it has exited."""
    expected = llm.generate(["The for statement"], SamplingParams(temperature=0, max_tokens=24),
                            use_tqdm=False)[0].outputs[0].text
    run = subprocess.Popen([sys.executable, "-m", "tritium.cli", "generate", "-tp", "2", "--temperature", "0",
                            "--max-tokens", "24", "The for statement"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert out == "The for statement" + expected + "\n"
    assert _session_processes(run.pid) == []


def _session_processes(session: int) -> list[int]:
    """The processes whose session id is `session` (field 6 of /proc/PID/stat, after the parenthesised name)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:  # it ended meanwhile
            continue
        if stat and int(stat.rpartition(")")[2].split()[3]) == session:
            found.append(int(entry.name))
    return found


def test_kv_cache_dtype_option(llm, tmp_path):
    """--kv-cache-dtype fp8 reaches the engine: the JSONL results are those of LLM(kv_cache_dtype="fp8")."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "The while loop"}) + "\n")
    assert main(["generate", "--input", str(src), "--output", str(dst), "--temperature", "0", "--max-tokens", "6",
                 "--ignore-eos", "--kv-cache-dtype", "fp8", "--calculate-kv-scales"]) == 0
    fp8 = LLM(default_model_path(), kv_cache_dtype="fp8", calculate_kv_scales=True)
    assert fp8.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = fp8.generate("The while loop", greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert json.loads(dst.read_text())["token_ids"] == expected


@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "a"}\n{"prompt": 3}\n', "in.jsonl:2: 'prompt' must be a string"),
    ('{"prompt": "a"}\nnot json\n', "in.jsonl:2: not JSON"),
    ('{"prompt": "a", "messages": []}\n', "in.jsonl:1: give exactly one of"),
    ('{"prompt_token_ids": [1, "x"]}\n', "in.jsonl:1: 'prompt_token_ids' must be a list of integers"),
    ("\n\n", "holds no prompts"),
    ('{"prompt": "a", "temprature": 0}\n', "in.jsonl:1: unknown field 'temprature'"),
    ('{"prompt": "a"}\n{"prompt": "b", "temperature": -1}\n', "in.jsonl:2: temperature must be a finite number >= 0"),
    ('{"prompt": "a", "max_tokens": "5"}\n', "in.jsonl:1: max_tokens must be an integer in [1, 2147483647]"),
    ('{"prompt": "a", "stop": ""}\n', "in.jsonl:1: stop: each string must have 1 to 1024 characters"),
    ('{"prompt": "a", "structured_outputs": {"regex": "a", "choice": ["b"]}}\n',
     "in.jsonl:1: structured_outputs takes"),
])
def test_bad_jsonl_is_named_by_line_before_the_model_loads(tmp_path, capsys, monkeypatch, content, message):
    import tritium.generate

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input file was checked")

    monkeypatch.setattr(tritium.generate.LLM, "from_config", no_model)
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--input", str(src)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    ([], "give PROMPT arguments or --input FILE"),
    (["hello", "--input", "x.jsonl"], "give PROMPT arguments or --input FILE"),
    (["hello", "--output", "x.jsonl"], "--output goes with --input"),
    (["hello", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["hello", "--model", "/nonexistent/folder"], "tritium generate: no such path: /nonexistent/folder"),
    (["hello", "--skip-tokenizer-init"], "--skip-tokenizer-init goes with --input"),
    (["hello", "--calculate-kv-scales"], "calculate_kv_scales needs an fp8 KV cache"),
    (["hello", "--kv-cache-dtype", "fp8_e5m2"], "invalid choice: 'fp8_e5m2'"),
])
def test_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
