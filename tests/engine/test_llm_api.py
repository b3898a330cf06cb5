"""The Python API in vLLM's shapes (tritium/engine/llm.py, outputs.py, sampling_params.py): LLM() takes the demo
model, LLM(seed=...) repeats a run, max_tokens=None runs to the context, top_k=-1 keeps every token, and logprobs
come as Logprob objects (their values are judged against transformers in test_sampling.py)."""

from pathlib import Path

import pytest

import tritium
from tritium import LLM, Logprob, SamplingParams, default_model_path

CONTEXT = 20


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=CONTEXT)  # no model: the demo model


def test_default_model_path_is_the_shipped_demo_model(llm):
    folder = Path(default_model_path())
    assert (folder / "config.json").is_file() and folder.parent == Path(tritium.__file__).parent
    assert llm.engine.model_config.vocab_size == 4096  # the demo model's vocabulary


def test_max_tokens_none_runs_up_to_the_context(llm):
    prompt = llm.engine.tokenizer.encode("The for statement")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=None, ignore_eos=True, seed=0),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == CONTEXT - len(prompt) and out.finish_reason == "length"
    with pytest.raises(ValueError, match="leaves no room to generate"):
        llm.generate({"prompt_token_ids": [1] * CONTEXT}, SamplingParams(max_tokens=None), use_tqdm=False)


def test_top_k_minus_one_keeps_every_token(llm):
    runs = [llm.generate("Exceptions", SamplingParams(top_k=k, seed=3, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids for k in (-1, 0)]
    assert runs[0] == runs[1]


def test_an_engine_seed_repeats_unseeded_requests():
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = []
    for seed in (7, 7, 8):
        results = LLM(seed=seed, max_model_len=CONTEXT).generate(["Exceptions"], params, use_tqdm=False)
        runs.append([o.token_ids for r in results for o in r.outputs])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    with pytest.raises(ValueError, match="seed must be an integer"):
        LLM(seed="7")


def test_logprobs_are_logprob_objects(llm):
    out = llm.generate("Exceptions", SamplingParams(temperature=0, max_tokens=3, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    for token, entry in zip(out.token_ids, out.logprobs):
        assert all(isinstance(v, Logprob) for v in entry.values())
        assert [v.rank for v in entry.values()] == [1, 2] and next(iter(entry)) == token  # greedy: rank 1
        assert entry[token].decoded_token == llm.engine.tokenizer.decode([token], skip_special_tokens=False)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
