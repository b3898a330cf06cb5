"""Sampling: the batched sampler on its own, and the engine's samples and logprobs judged by
the distribution computed from transformers' logits on the same weights."""

import pytest
import torch

from tritium import LLM, SamplingParams
from tritium.engine.sampler import sample

PROMPTS = ["The cat sat on the", "Hello, world! 42"]


def test_vllm_conventions_for_all_tokens_and_no_max_tokens():
    """top_k -1 (or 0) keeps every token; max_tokens None runs up to the context; -2 is refused, naming top_k."""
    assert SamplingParams(top_k=-1).top_k == 0 and SamplingParams(max_tokens=None).max_tokens is None
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)


def test_sampler_rows_independent_of_batch(gen):
    """Greedy rows take the argmax; a seeded row draws the same token alone as in any batch."""
    logits = torch.randn(6, 50, generator=gen)
    params = [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(seed=2, top_k=5),
              SamplingParams(), SamplingParams(seed=3, top_p=0.5, temperature=0.7), SamplingParams(seed=4, min_p=0.2)]
    gens = lambda: [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]  # noqa: E731
    tokens, logprobs, _ = sample(logits, params, gens()).result()
    assert tokens[0] == int(logits[0].argmax()) and logprobs == [None] * 6
    for row, p in enumerate(params):
        if p.seed is not None:
            alone, _, _ = sample(logits[row:row + 1], [p], [torch.Generator().manual_seed(p.seed)]).result()
            assert alone == [tokens[row]]
    again, _, _ = sample(logits, params, gens()).result()
    assert [t for t, p in zip(again, params) if p.seed is not None] == [t for t, p in zip(tokens, params) if p.seed]


def test_sampler_frequencies(gen):
    """Draw frequencies follow softmax(logits / temperature) over the tokens the filter keeps."""
    logits = torch.randn(8, generator=gen) * 2
    draws = 20000
    torch.manual_seed(0)
    for p in (SamplingParams(temperature=0.8), SamplingParams(top_k=3), SamplingParams(top_p=0.7)):
        probs = torch.softmax(logits / p.temperature, -1)
        ranked, order = probs.sort(descending=True)
        kept = int((ranked.cumsum(0) - ranked < p.top_p).sum()) if p.top_p < 1 else p.top_k or 8
        assert kept < 8 or p.top_p == 1
        expected = torch.zeros(8)
        expected[order[:kept]] = ranked[:kept] / ranked[:kept].sum()
        tokens, _, _ = sample(logits.expand(draws, -1).clone(), [p] * draws, [None] * draws).result()
        freq = torch.bincount(torch.tensor(tokens), minlength=8) / draws
        assert (freq - expected).abs().max() < 0.015, (p, freq, expected)


@pytest.fixture(scope="module")
def llm(text_model):
    return LLM(str(text_model[0]), block_size=4)


def hf_logits(hf, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """transformers' logits for each generated position: row j is the distribution output_ids[j] was drawn from."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + output_ids])).logits[0].float()
    return logits[len(prompt_ids) - 1:-1]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, logprobs=4),
                                    SamplingParams(temperature=0.8, seed=5, logprobs=4, n=2),
                                    SamplingParams(seed=6, logprobs=0)])
def test_logprobs_match_transformers(text_model, llm, params):
    _, hf, _ = text_model
    params = SamplingParams(**{**params.__dict__, "max_tokens": 8, "ignore_eos": True})
    outside_top_k = 0
    for request in llm.generate(PROMPTS, params, use_tqdm=False):
        for out in request.outputs:
            expected = torch.log_softmax(hf_logits(hf, request.prompt_token_ids, out.token_ids), -1)
            assert len(out.logprobs) == len(out.token_ids) == 8
            for token, entry, row in zip(out.token_ids, out.logprobs, expected):
                top = row.topk(params.logprobs)
                assert list(entry)[:params.logprobs] == top.indices.tolist()
                values = [lp.logprob for lp in entry.values()]
                assert values == sorted(values, reverse=True)
                assert torch.allclose(torch.tensor(values), row[list(entry)], atol=1e-4)
                assert len(entry) == params.logprobs + (token not in top.indices.tolist())
                outside_top_k += token not in top.indices.tolist()
                # vLLM's Logprob: rank 1..k for the top k; the chosen token's own rank in the vocabulary otherwise.
                ranks = [lp.rank for lp in entry.values()]
                assert ranks[:params.logprobs] == list(range(1, params.logprobs + 1))
                if token not in top.indices.tolist():
                    # 1 + the tokens more likely than it, give or take rounding
                    least, most = (int((row > row[token] + margin).sum()) + 1 for margin in (1e-4, -1e-4))
                    assert least <= ranks[-1] <= most and ranks[-1] > params.logprobs
                assert [lp.decoded_token for lp in entry.values()] == [
                    llm.engine.tokenizer.decode([t], skip_special_tokens=False) for t in entry]
            chosen = expected.gather(1, torch.tensor(out.token_ids)[:, None]).sum()
            assert out.cumulative_logprob == pytest.approx(float(chosen), abs=1e-4)
    assert outside_top_k > 0 or params.greedy  # sampling did reach past the top k: that case was checked too


def test_no_logprobs_unless_asked(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, seed=1), use_tqdm=False)[0].outputs[0]
    assert out.logprobs is None and out.cumulative_logprob is None


FILTERS = {"top_k": dict(top_k=3), "top_p": dict(top_p=0.3), "min_p": dict(min_p=0.2),
           "all": dict(top_k=20, top_p=0.5, min_p=0.1)}


@pytest.mark.parametrize("name", list(FILTERS))
def test_filters_never_emit_excluded_tokens(text_model, llm, name):
    _, hf, _ = text_model
    temperature, rtol = 0.3, 1e-3  # a sharp distribution, so that each filter leaves a few tokens
    params = SamplingParams(temperature=temperature, n=4, seed=9, max_tokens=6, ignore_eos=True, **FILTERS[name])
    allowed_sizes, not_argmax = [], 0
    for request in llm.generate(PROMPTS, params, use_tqdm=False):
        for out in request.outputs:
            probs = torch.softmax(hf_logits(hf, request.prompt_token_ids, out.token_ids) / temperature, -1)
            for token, p in zip(out.token_ids, probs):
                ranked = p.sort(descending=True).values
                allowed = torch.ones_like(p, dtype=torch.bool)
                if params.top_k:
                    allowed &= p >= ranked[params.top_k - 1] * (1 - rtol)
                allowed &= p >= params.min_p * ranked[0] * (1 - rtol)
                if params.top_p < 1:  # of what the other filters keep: the mass ranked above a token is < top_p
                    kept, order = torch.where(allowed, p, 0.0).sort(descending=True)
                    in_top_p = torch.zeros_like(allowed)
                    in_top_p[order] = kept.cumsum(0) - kept < params.top_p * kept.sum() * (1 + rtol)
                    allowed &= in_top_p
                assert allowed[token], f"token {token} (p={p[token]:.4f}) is excluded by {FILTERS[name]}"
                allowed_sizes.append(int(allowed.sum()))
                not_argmax += token != int(p.argmax())
    assert max(allowed_sizes) < probs.shape[-1] and max(allowed_sizes) > 1  # the filters cut, yet leave choices
    assert not_argmax > 0  # and it did sample, not just take the top token


def test_n_samples_seeded_and_distinct(llm):
    params = SamplingParams(n=3, seed=11, max_tokens=8, ignore_eos=True)
    first = llm.generate(PROMPTS, params, use_tqdm=False)
    again = llm.generate(PROMPTS, params, use_tqdm=False)
    for request, repeat in zip(first, again):
        assert [o.index for o in request.outputs] == [0, 1, 2]
        samples = [o.token_ids for o in request.outputs]
        assert samples == [o.token_ids for o in repeat.outputs]
        assert len({tuple(s) for s in samples}) == 3
        assert all(len(o.token_ids) == 8 and o.text for o in request.outputs)
    # Sample k draws from the stream of seed + k, so each sample is a single-sample run of that seed.
    for k in range(3):
        single = llm.generate(PROMPTS, SamplingParams(seed=11 + k, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert [r.outputs[0].token_ids for r in single] == [r.outputs[k].token_ids for r in first]
    unseeded = llm.generate(PROMPTS[0], SamplingParams(n=4, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(o.token_ids) for o in unseeded.outputs}) == 4
    assert llm.engine.pages.num_free == len(llm.engine.pages.ref_count)


def test_n_samples_share_prompt_pages(text_model):
    llm = LLM(str(text_model[0]), block_size=4)
    prompt = llm.engine.tokenizer.encode("The cat sat on the mat, and the dog")
    assert len(prompt) > 9
    seqs = llm.engine.add_request(prompt, SamplingParams(n=3, max_tokens=4))
    batch, _ = llm.engine.scheduler.schedule()
    full_pages = (len(prompt) - 1) // 4 * 4  # the last prompt token always runs, to give logits
    assert [n for _, n in batch] == [len(prompt)] + [len(prompt) - full_pages] * 2
    assert seqs[1].pages[:full_pages // 4] == seqs[0].pages[:full_pages // 4]
