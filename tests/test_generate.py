"""`tritium generate` (tritium/generate.py through tritium/cli.py) on the default model that ships in the package."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.engine.helpers import assert_greedy_equals_transformers
from tritium import LLM, SamplingParams
from tritium.cli import main
from tritium.generate import DEFAULT_MODEL_NOTE, default_model_dir


@pytest.fixture(scope="module")
def llm():
    return LLM(str(default_model_dir()))


def test_default_model_folder_is_complete_and_in_budget():
    folder = default_model_dir()
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
    assert_greedy_equals_transformers(default_model_dir(), ["The for statement", "A list comprehension",
                                                            "Return the number of", "Exceptions"], max_tokens=24)


def test_prompt_streams_the_same_text_as_generate(llm, capsys):
    # Options not given (top_p here) come from the model's generation_config.json.
    params = llm.default_sampling_params(temperature=0.8, seed=5, max_tokens=24)
    assert params.top_p == 0.9
    expected = llm.generate(["The for statement"], params, use_tqdm=False)[0].outputs[0].text
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


@pytest.mark.parametrize(("content", "message"), [
    ('{"prompt": "a"}\n{"prompt": 3}\n', "in.jsonl:2: 'prompt' must be a string"),
    ('{"prompt": "a"}\nnot json\n', "in.jsonl:2: not JSON"),
    ('{"prompt": "a", "messages": []}\n', "in.jsonl:1: give exactly one of"),
    ('{"prompt_token_ids": [1, "x"]}\n', "in.jsonl:1: 'prompt_token_ids' must be a list of integers"),
    ("\n\n", "holds no prompts"),
])
def test_bad_jsonl_is_named_by_line(tmp_path, capsys, content, message):
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
    (["hello", "--temperature", "-1"], "temperature must be >= 0"),
    (["hello", "--model", "/nonexistent/folder"], "tritium generate:"),
])
def test_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
