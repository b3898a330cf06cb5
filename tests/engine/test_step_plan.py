"""The scheduler's plans (tritium/engine/scheduler.py, step_plan.py), without a model: what each sequence feeds and
where, how it samples, which decodes are launched ahead (with their pages reserved) and when a plan takes them; a
plan survives pickling (it is what tensor-parallel ranks are sent)."""

import pickle

from tritium.engine.page_pool import PagePool
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.scheduler import Scheduler
from tritium.engine.sequence import Sequence


def advance(batch, tokens: dict[int, int]) -> None:
    """What the engine does after a step: the tokens ran, and each sequence that sampled gets its token."""
    for seq, n in batch:
        seq.num_computed += n
        if seq.num_computed == len(seq):
            seq.output_ids.append(tokens.get(seq.seq_id, 7))


def test_plans_say_what_each_sequence_runs_and_launch_decodes_ahead():
    pages = PagePool(num_pages=16, page_size=4, prefix_caching=False)
    sched = Scheduler(pages, max_num_batched_tokens=8, max_num_seqs=4)
    a = Sequence(list(range(10, 16)), SamplingParams(temperature=0, max_tokens=2))  # 6 tokens, ends after 2
    b = Sequence(list(range(20, 25)), SamplingParams(temperature=0.5, seed=9, max_tokens=5, frequency_penalty=0.5),
                 index=2)
    sched.add(a)
    sched.add(b)

    batch, plan = sched.schedule()  # a's prompt, then b's first 2 tokens (the budget)
    assert [n for _, n in batch] == [6, 2]
    sa, sb = plan.seqs
    assert (sa.seq_id, sb.seq_id, sa.start, sb.start) == (a.seq_id, b.seq_id, 0, 0)
    assert (sa.tokens, sb.tokens) == (a.prompt_ids, b.prompt_ids[:2])
    assert (sa.pages, sb.pages) == (a.pages, b.pages) and len(a.pages) == 2
    assert (sa.samples, sb.samples) == (True, False) and sa.params is a.params  # b's prefill is not done
    assert sa.prompt_ids is None and sb.prompt_ids == b.prompt_ids  # b's penalties read its prompt
    assert plan.ahead == [] and not plan.from_ahead and plan.bitmask is None
    advance(batch, {})

    batch, plan = sched.schedule()  # a decodes, b finishes its prompt: both sample, nothing waits
    sa, sb = plan.seqs
    assert (sa.start, sb.start, sa.tokens, sb.tokens) == (6, 2, [7], b.prompt_ids[2:])
    assert (sa.seed, sb.seed) == (None, 9 + 2)  # the request's seed + the sample's index
    # a ends on this token by length: only b's next decode is launched ahead, with the page for it reserved
    assert plan.ahead == [1] and len(b.pages) == 2 and not plan.from_ahead
    c = Sequence([1, 2, 3], SamplingParams(max_tokens=3))
    sched.add(c)  # arrives meanwhile
    advance(batch, {})
    sched.finish(a, "length")

    batch, plan = sched.schedule()  # b's decode launched ahead is taken; c waits one step
    assert [s for s, _ in batch] == [b] and plan.from_ahead and plan.seqs[0].start == 5
    assert plan.ahead == []  # c waits: nothing is launched ahead
    advance(batch, {})

    batch, plan = sched.schedule()
    assert [s for s, _ in batch] == [b, c] and not plan.from_ahead
    copy = pickle.loads(pickle.dumps(plan))
    assert copy == plan and copy is not plan


def test_no_decode_is_launched_ahead_without_its_page():
    pages = PagePool(num_pages=2, page_size=4, prefix_caching=False)
    sched = Scheduler(pages, max_num_batched_tokens=16, max_num_seqs=2)
    seq = Sequence(list(range(8)), SamplingParams(temperature=0, max_tokens=4))
    sched.add(seq)
    batch, plan = sched.schedule()
    assert plan.ahead == [] and len(seq.pages) == 2 and pages.num_free == 0  # the 9th token needs a third page
