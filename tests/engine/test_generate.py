"""Generation through the engine against Hugging Face transformers on the same random weights (float32).

A batch of prompts of different lengths, some sharing a prefix, under the default settings, without prefix
caching, with a token budget small enough to force chunked prefills, and with a page pool small enough to
force preemption: the tokens must be identical to transformers' greedy `generate` in every case. Then text:
text prompts, chat conversations and stop strings, judged by transformers' tokenizer on the same folder.
"""

import pytest
import torch

from tests.engine.helpers import SENTENCES
from tests.models.helpers import save_family
from tritium import LLM, SamplingParams

MAX_NEW = 6


@pytest.fixture(scope="module", params=["llama3", "mistral", "qwen2", "qwen3"])
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
    "preemption": {"num_kv_pages": 12, "max_model_len": 32},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_transformers(family_dir, setting):
    path, prompts, expected = family_dir
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4, **SETTINGS[setting])
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.pages.num_free == len(llm.engine.pages.ref_count)  # every page back in the pool
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_second_time(family_dir):
    path, prompts, expected = family_dir
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    [seq] = llm.engine.add_request(prompts[1], params)  # shares 9 tokens = two full pages with prompts[0]
    llm.engine.scheduler.schedule()
    assert seq.num_computed == 8


def test_bad_requests_leave_engine_serving(family_dir):
    path, prompts, expected = family_dir
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4, max_model_len=24)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1] * 20}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([{"prompt_token_ids": [1, 10**6]}], params, use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate(["text"], params, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate([{"prompt_token_ids": prompts[0]}, 5], params, use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(stop="x", max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(logprobs=97, max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate({"prompt_token_ids": prompts[0]}, [params, params], use_tqdm=False)
    # A bad request after good ones in the same call: nothing was queued, so nothing runs later by surprise.
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": [1] * 20}], params, use_tqdm=False)
    assert not llm.engine.has_unfinished()
    outs = llm.generate([{"prompt_token_ids": prompts[2]}, {"prompt_token_ids": prompts[3]}], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[2:4]
    assert [o.request_id for o in outs] == ["0", "1"]  # ids are handed out only to queued requests


def test_sampling_params_errors():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 2}, {"max_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_sampling_seeded_and_filtered(family_dir):
    path, prompts, _ = family_dir
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4)
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
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4)
    stop = expected[3][2]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop], ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompts[3]}], params, use_tqdm=False)[0].outputs[0]
    cut = expected[3].index(stop) + 1
    assert out.token_ids == expected[3][:cut] and out.finish_reason == "stop"


TEXT_PROMPTS = ["The cat sat on the", "Hello, world!", "Caf\u00e9 \U0001f642 and"]


@pytest.fixture(scope="module")
def text_llm(text_model):
    return LLM(str(text_model[0]), block_size=4)


def hf_greedy(hf, prompt_ids: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_text_prompts_match_token_prompts(text_model, text_llm):
    _, _, hf_tok = text_model
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    ids = [hf_tok(p).input_ids for p in TEXT_PROMPTS]
    by_text = text_llm.generate(TEXT_PROMPTS, params, use_tqdm=False)
    by_dict = text_llm.generate([{"prompt": p} for p in TEXT_PROMPTS], params, use_tqdm=False)
    by_ids = text_llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    single = text_llm.generate(TEXT_PROMPTS[1], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in by_text] == [o.prompt_token_ids for o in by_dict] == ids
    assert [o.prompt for o in by_text] == TEXT_PROMPTS and by_ids[0].prompt is None
    tokens = lambda outs: [o.outputs[0].token_ids for o in outs]  # noqa: E731
    assert tokens(by_text) == tokens(by_dict) == tokens(by_ids) and tokens(single) == tokens(by_text)[1:2]
    assert [o.outputs[0].text for o in by_ids] == [o.outputs[0].text for o in by_text]


def test_greedy_text_matches_transformers(text_model, text_llm):
    _, hf, hf_tok = text_model
    max_new = 12
    outs = text_llm.generate(TEXT_PROMPTS, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True),
                             use_tqdm=False)
    for prompt, out in zip(TEXT_PROMPTS, outs):
        expected = hf_greedy(hf, hf_tok(prompt).input_ids, max_new)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].text == hf_tok.decode(expected, skip_special_tokens=True)


def test_chat_uses_the_template(text_model, text_llm):
    _, hf, hf_tok = text_model
    conversations = [[{"role": "user", "content": SENTENCES[0]}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "The cat?"}]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = text_llm.chat(conversations, params, use_tqdm=False)
    for conversation, out in zip(conversations, outs):
        ids = hf_tok.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"]
        assert out.prompt_token_ids == ids
        assert out.prompt == hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 6)
    [one] = text_llm.chat(conversations[0], params, use_tqdm=False)  # a single conversation
    assert one.outputs[0].token_ids == outs[0].outputs[0].token_ids
    [bare] = text_llm.chat(conversations[0], params, use_tqdm=False, add_generation_prompt=False)
    assert bare.prompt_token_ids == hf_tok.apply_chat_template(conversations[0])["input_ids"]
    with pytest.raises(ValueError, match="unknown role"):
        text_llm.chat([{"role": "tool", "content": "x"}], params, use_tqdm=False)


def test_stop_strings(text_model, text_llm):
    tok = text_llm.engine.tokenizer
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    base = text_llm.generate(TEXT_PROMPTS, free, use_tqdm=False)
    # A stop string spanning two tokens: the last character of one token's text and the first of the next.
    text, stop = None, None
    for out in base:
        pieces = [tok.decode([t]) for t in out.outputs[0].token_ids]
        pairs = [(a, b) for a, b in zip(pieces, pieces[1:]) if a and b and "\ufffd" not in a + b]
        if pairs:
            text, stop, prompt = out.outputs[0].text, pairs[-1][0][-1] + pairs[-1][1][0], out.prompt
            break
    assert stop is not None and stop in text
    cut = text.index(stop)
    never = "\x00never\x00"
    assert never not in text
    for stops, include, expected in [([stop], False, text[:cut]), ([never, stop], True, text[:cut + len(stop)])]:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=stops,
                                include_stop_str_in_output=include)
        out = text_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert out.text == expected and out.finish_reason == "stop" and out.stop_reason == stop
        # Generation ends at the token that completes the stop string (or soon after, if it waits on a character).
        assert stop in tok.decode(out.token_ids) and len(out.token_ids) < 16
    out = text_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=never),
                            use_tqdm=False)[0].outputs[0]
    assert out.text == text and out.finish_reason == "length" and out.stop_reason is None


def test_stop_token_leaves_its_text_out(text_model, text_llm):
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = text_llm.generate(TEXT_PROMPTS[0], free, use_tqdm=False)[0].outputs[0]
    stop = out.token_ids[3]
    cut = out.token_ids.index(stop)
    tok = text_llm.engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop])
    stopped = text_llm.generate(TEXT_PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == out.token_ids[:cut + 1] and stopped.stop_reason == stop
    assert stopped.text == tok.decode(out.token_ids[:cut])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop],
                            include_stop_str_in_output=True)
    assert text_llm.generate(TEXT_PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text == tok.decode(
        out.token_ids[:cut + 1])


def test_skip_tokenizer_init(family_dir):
    path, prompts, expected = family_dir  # a model folder without tokenizer files
    with pytest.raises(ValueError, match="tokenizer missing: .* has no tokenizer.json.*skip_tokenizer_init=True"):
        LLM(str(path))
    llm = LLM(str(path), skip_tokenizer_init=True, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    [out] = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)
    assert out.outputs[0].token_ids == expected[0] and out.outputs[0].text == "" and out.prompt is None
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate({"prompt": "text"}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)


@pytest.mark.parametrize("family", ["gemma3", "qwen3_moe"])
def test_other_families_greedy_match_transformers(family, tmp_path):
    """Gemma (sliding and global layers, two RoPE tables) and a mixture of experts through the engine, with chunked
    prefills mixed with decodes: transformers' greedy tokens."""
    hf = save_family(family, tmp_path)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 3, 12)]
    expected = []
    for p in prompts:
        with torch.no_grad():
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, block_size=4, max_num_batched_tokens=7)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
