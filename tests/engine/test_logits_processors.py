"""The logits processors: penalties, logit_bias and min_tokens, on their own against formulas computed from the
host's token lists, and in the engine (launch-ahead, preemption) against transformers' logits on the same weights;
prompt logprobs against transformers'."""

import pytest
import torch

from tritium import LLM, SamplingParams
from tritium.engine.logits_processors import LogitsProcessors
from tritium.engine.sequence import Sequence
from tritium.engine.structured import apply_bitmask

PROMPTS = ["The cat sat on the", "Hello, world! 42"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": True}, "repetition_penalty"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"stop_token_ids": [-2]}, "stop_token_ids"), ({"structured_outputs": {"json": {}}}, "structured_outputs")])
def test_new_fields_are_checked_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    assert SamplingParams(logit_bias={"7": 1.5}).logit_bias == {7: 1.5}


def reference(logits: torch.Tensor, seq: Sequence, eos: set[int]) -> torch.Tensor:
    """vLLM's processing of one row from the host's token lists, in float64."""
    p, out = seq.params, logits.double().clone()
    for token, bias in (p.logit_bias or {}).items():
        out[token] += bias
    if len(seq.output_ids) < p.min_tokens:
        out[list(set(p.stop_token_ids) | eos)] = float("-inf")
    counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long), minlength=len(out)).double()
    seen = set(seq.prompt_ids) | set(seq.output_ids)
    for t in seen:
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    return out - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_processors_equal_the_formulas_step_after_step(gen):
    """Counts kept on the device by `record` give, step after step, what the host's token lists give."""
    vocab, eos = 40, {0}
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=0.3, repetition_penalty=1.3),
              SamplingParams(),  # untouched row between penalized ones
              SamplingParams(repetition_penalty=0.8, logit_bias={3: 5.0, 9: -2.5}, min_tokens=3,
                             stop_token_ids=(5,)),
              SamplingParams(frequency_penalty=-0.5, min_tokens=2, ignore_eos=True, stop_token_ids=(7,))]
    seqs = [Sequence(torch.randint(1, vocab, (6,), generator=gen).tolist(), p) for p in params]
    procs = LogitsProcessors(vocab, torch.device("cpu"), eos)
    for _ in range(6):
        logits = torch.randn(len(seqs), vocab, generator=gen) * 3
        got = procs.apply(logits, seqs, [len(s) - 1 for s in seqs])
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(got[row].double(), reference(logits[row], seq, eos if not
                                       seq.params.ignore_eos else set()), rtol=1e-5, atol=1e-5)
        tokens = torch.randint(0, vocab, (len(seqs),), generator=gen)
        tokens[0] = seqs[0].output_ids[-1] if seqs[0].output_ids else tokens[0]  # a repeat: counts above 1
        procs.record(seqs, tokens)
        for seq, t in zip(seqs, tokens.tolist()):
            seq.output_ids.append(t)
    unchanged = [Sequence([1, 2], SamplingParams())]
    logits = torch.randn(1, vocab, generator=gen)
    assert procs.apply(logits, unchanged, [1]) is logits  # nothing asked: no copy, no work


def test_rows_are_reused_zeroed(gen):
    procs = LogitsProcessors(16, torch.device("cpu"), set())
    first = Sequence([1, 2], SamplingParams(frequency_penalty=1.0))
    procs.apply(torch.zeros(1, 16), [first], [1])
    procs.record([first], torch.tensor([4]))
    procs.release(first.seq_id)
    second = Sequence([3], SamplingParams(frequency_penalty=1.0))
    out = procs.apply(torch.ones(1, 16), [second], [0])
    assert procs.penalties.row_of[second.seq_id] == procs.penalties.row_of.get(second.seq_id) == 0
    assert torch.equal(out, torch.ones(1, 16))  # the previous owner's count of token 4 is gone


def test_bitmask_applied_bit_by_bit(gen):
    logits = torch.randn(3, 70, generator=gen)
    mask = torch.randint(-2**31, 2**31 - 1, (3, 3), dtype=torch.int32, generator=gen)
    got = logits.clone()
    apply_bitmask(got, mask)
    for row in range(3):
        for t in range(70):
            allowed = (int(mask[row, t // 32]) >> (t % 32)) & 1
            assert got[row, t] == (logits[row, t] if allowed else float("-inf"))


def hf_logits(hf, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt_ids + output_ids])).logits[0].double()


@pytest.mark.parametrize("pages", [None, 14], ids=["roomy", "preempting"])
def test_penalized_greedy_tokens_are_the_argmax_of_penalized_transformers_logits(text_model, pages):
    """Greedy with every processor at once, decodes launched ahead, and (with few pages) sequences preempted and
    recomputed: each token is the argmax of transformers' logits processed by the formulas."""
    folder, hf, _ = text_model
    llm = LLM(str(folder), block_size=4, num_kv_pages=pages, max_model_len=56)
    params = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.4, presence_penalty=0.5,
                             frequency_penalty=0.4, logit_bias={17: 2.0}, min_tokens=6),
              SamplingParams(temperature=0, max_tokens=24, frequency_penalty=1.5, ignore_eos=True)]
    outs = llm.generate(PROMPTS * 2, params * 2, use_tqdm=False)
    if pages:
        assert llm.engine.scheduler.num_preemptions > 0
    for request, p in zip(outs, params * 2):
        out = request.outputs[0]
        seq = Sequence(request.prompt_token_ids, p)
        rows = hf_logits(hf, request.prompt_token_ids, out.token_ids)[len(request.prompt_token_ids) - 1:]
        for token, row in zip(out.token_ids, rows):
            expected = reference(row, seq, llm.engine.eos_ids)
            top2 = expected.topk(2).values
            if top2[0] - top2[1] > 1e-3:  # a near tie may go either way in float32
                assert token == int(expected.argmax())
            seq.output_ids.append(token)
        assert len(out.token_ids) >= p.min_tokens
    assert llm.engine.runner.processors.penalties.row_of == {}  # every row given back


def test_min_tokens_holds_off_a_forced_end(text_model):
    """EOS biased to win at every step: it comes exactly after min_tokens tokens, as do stop ids."""
    folder, _, _ = text_model
    llm = LLM(str(folder), block_size=4)
    eos = min(llm.engine.eos_ids)
    for stop_ids, forced in (((), eos), ((11,), 11)):
        params = SamplingParams(temperature=0, max_tokens=20, min_tokens=5, logit_bias={forced: 100},
                                stop_token_ids=stop_ids)
        out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids[-1] == forced and len(out.token_ids) == 6 and out.finish_reason == "stop"
        assert forced not in out.token_ids[:5]


def test_stop_strings_wait_for_min_tokens(text_model):
    folder, _, _ = text_model
    llm = LLM(str(folder), block_size=4)
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    first_piece = llm.engine.tokenizer.decode(free.token_ids[:1])
    assert first_piece.strip()
    stop = first_piece.strip()[0]
    cut = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop),
                       use_tqdm=False)[0].outputs[0]
    held = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop,
                                                   min_tokens=8), use_tqdm=False)[0].outputs[0]
    assert stop in llm.engine.tokenizer.decode(free.token_ids[:8])  # so an unchecked stop would have cut earlier
    assert len(cut.token_ids) == 1 and cut.finish_reason == "stop"
    assert len(held.token_ids) == 8 and held.finish_reason == "stop" and held.stop_reason == stop


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 5}], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_transformers(text_model, options):
    folder, hf, _ = text_model
    llm = LLM(str(folder), block_size=4, **options)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    first = llm.generate(PROMPTS, params, use_tqdm=False)
    again = llm.generate(PROMPTS, params, use_tqdm=False)  # the prompts' pages are cached now: still computed
    for request, repeat in zip(first, again):
        ids = request.prompt_token_ids
        expected = torch.log_softmax(hf_logits(hf, ids, [])[:-1], -1)
        assert request.prompt_logprobs[0] is None and len(request.prompt_logprobs) == len(ids)
        for token, entry, row in zip(ids[1:], request.prompt_logprobs[1:], expected):
            top = row.topk(3)
            assert list(entry)[:3] == top.indices.tolist() and [lp.rank for lp in list(entry.values())[:3]] == [1, 2, 3]
            assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4)  # vLLM's Logprob objects
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            assert entry[token].decoded_token == llm.engine.tokenizer.decode([token], skip_special_tokens=False)
        assert [e and {t: round(v.logprob, 4) for t, v in e.items()} for e in repeat.prompt_logprobs] == \
               [e and {t: round(v.logprob, 4) for t, v in e.items()} for e in request.prompt_logprobs]
