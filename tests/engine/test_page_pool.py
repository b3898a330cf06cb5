"""The page pool's prefix cache at the page sizes the engine runs (tritium/engine/page_pool.py): hits are whole
pages only, and generation with hits equals generation without them."""

import pytest

from tritium import LLM, SamplingParams, default_model_path
from tritium.engine.page_pool import PagePool
from tritium.engine.sequence import Sequence


@pytest.mark.parametrize("page_size", [16, 64])
def test_prefix_hits_are_whole_shared_pages(page_size):
    pool = PagePool(num_pages=16, page_size=page_size)
    shared = list(range(1, 2 * page_size + 10))  # two whole pages and a part
    first = Sequence(shared + [900, 901], SamplingParams())
    second = Sequence(shared + [902], SamplingParams())
    assert pool.allocate_prompt(first)
    pool.commit_full_pages(first, len(first))
    assert pool.allocate_prompt(second)
    assert second.num_computed == 2 * page_size  # the shared part page, and the unshared tail, are computed again
    assert second.pages[:2] == first.pages[:2] and second.pages[2] != first.pages[2]
    pool.free_sequence(first)
    pool.free_sequence(second)
    assert pool.num_free == pool.num_pages


def test_generation_at_page_64_equals_it_without_prefix_caching():
    """Greedy tokens of prompts sharing more than a page of prefix are the same with the cache's hits (page 64) as
    without prefix caching, and the hits happen."""
    model = default_model_path()
    prefix = "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or " \
             "list) or other iterable object. " * 3
    prompts = [prefix + end for end in ("It runs", "The else clause", "A break statement")]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cached = LLM(model, block_size=64, dtype="float32", max_model_len=256)
    assert len(cached.engine.tokenizer.encode(prefix)) > 64
    first = cached.generate(prompts[:1], params, use_tqdm=False)  # fills the cache
    ids = [cached.engine.tokenizer.encode(p) for p in prompts]
    seqs = [cached.engine.add_request(i, params, str(k))[0] for k, i in enumerate(ids[1:])]
    cached.engine.scheduler.schedule()
    assert all(s.num_computed >= 64 for s in seqs)  # the shared pages were hits
    while cached.engine.has_unfinished():
        cached.engine.step()
    plain = LLM(model, block_size=64, dtype="float32", max_model_len=256, enable_prefix_caching=False)
    expected = plain.generate(prompts, params, use_tqdm=False)
    got = [first[0].outputs[0].token_ids] + [s.output_ids for s in seqs]
    assert got == [r.outputs[0].token_ids for r in expected]
