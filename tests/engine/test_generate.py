"""Greedy generation through the engine against Hugging Face transformers on the same random weights (float32).

A batch of prompts of different lengths, some sharing a prefix, under the default settings, without prefix
caching, with a token budget small enough to force chunked prefills, and with a page pool small enough to
force preemption: the tokens must be identical to transformers' greedy `generate` in every case.
"""

import pytest
import torch

from tests.models.test_llama import save_family
from tritium import LLM, SamplingParams

MAX_NEW = 6


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def family_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_family(request.param, path)
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 96, (9,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 7)]
    prompts += [torch.randint(0, 96, (n,), generator=g).tolist() for n in (1, 12, 5)]
    expected = []
    for p in prompts:
        with torch.no_grad():
            ids = torch.tensor([p])  # an explicit mask: otherwise generate masks prompt tokens equal to pad_token_id
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    return path, prompts, expected


SETTINGS = {
    "default": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 5},
    "preemption": {"num_kv_blocks": 12, "max_model_len": 32},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_transformers(family_dir, setting):
    path, prompts, expected = family_dir
    llm = LLM(str(path), block_size=4, **SETTINGS[setting])
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.blocks.num_free == len(llm.engine.blocks.ref_count)  # every page back in the pool
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_second_time(family_dir):
    path, prompts, expected = family_dir
    llm = LLM(str(path), block_size=4)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    seq = llm.engine.add_request(prompts[1], params)  # shares 9 tokens = two full pages with prompts[0]
    llm.engine.scheduler.schedule()
    assert seq.num_computed == 8


def test_bad_requests_leave_engine_serving(family_dir):
    path, prompts, expected = family_dir
    llm = LLM(str(path), block_size=4, max_model_len=24)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1] * 20}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([{"prompt_token_ids": [1, 10**6]}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text"], params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected[2]


def test_sampling_params_errors():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"min_p": 2}, {"max_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_sampling_seeded_and_filtered(family_dir):
    path, prompts, _ = family_dir
    llm = LLM(str(path), block_size=4)
    batch = [{"prompt_token_ids": p} for p in prompts]
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_NEW, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(batch, seeded, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(batch, seeded, use_tqdm=False)]
    assert first == again
    # top_k=1 and a tiny top_p both leave only the most likely token: sampling must equal greedy.
    greedy = [o.outputs[0].token_ids for o in llm.generate(batch, SamplingParams(temperature=0, max_tokens=MAX_NEW,
                                                                                 ignore_eos=True), use_tqdm=False)]
    for narrow in (SamplingParams(top_k=1, seed=1, max_tokens=MAX_NEW, ignore_eos=True),
                   SamplingParams(top_p=1e-6, seed=2, max_tokens=MAX_NEW, ignore_eos=True),
                   SamplingParams(min_p=1.0, seed=3, max_tokens=MAX_NEW, ignore_eos=True)):
        assert [o.outputs[0].token_ids for o in llm.generate(batch, narrow, use_tqdm=False)] == greedy


def test_stop_token_ids(family_dir):
    path, prompts, expected = family_dir
    llm = LLM(str(path), block_size=4)
    stop = expected[3][2]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop], ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompts[3]}], params, use_tqdm=False)[0].outputs[0]
    cut = expected[3].index(stop) + 1
    assert out.token_ids == expected[3][:cut] and out.finish_reason == "stop"
