"""On a GPU: bf16 generation on a random Llama-3.1-8B-shaped model with decode steps replayed from CUDA graphs gives
the greedy tokens of eager decode steps."""

import pytest
import torch

from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams
from tritium.models.shapes import shape_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.fixture(scope="module")
def engine():
    engine = LLMEngine(shape_config("llama-3.1-8b"), EngineConfig(skip_tokenizer_init=True, max_model_len=4096,
                       max_num_seqs=16, gpu_memory_utilization=0.5, enable_prefix_caching=False))
    assert engine.runner.graphs is not None and engine.runner.graphs.buckets == [1, 2, 4, 8, 16]
    yield engine
    del engine
    torch.cuda.empty_cache()


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    seqs = [engine.add_request(p, params, str(i))[0] for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    return seqs


def both_ways(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list, list]:
    graphs = engine.runner.graphs
    replays = []
    original = graphs.forward
    graphs.forward = lambda *args: replays.append(len(args[0])) or original(*args)
    try:
        with_graphs = generate(engine, prompts, params)
    finally:
        graphs.forward = original
    assert replays, "no decode step replayed a graph"
    engine.runner.graphs = None
    try:
        eager = generate(engine, prompts, params)
    finally:
        engine.runner.graphs = graphs
    return with_graphs, eager


@pytest.mark.parametrize("batch", [1, 8])
def test_graph_decode_greedy_equals_eager(engine, batch):
    g = torch.Generator().manual_seed(batch)
    # At most 2048 prompt tokens: one prefill step, then every decode step runs all `batch` sequences (a bucket
    # size, so the graph's matmuls have the eager ones' shapes and the tokens must agree exactly).
    prompts = [torch.randint(0, 128256, (int(n),), generator=g).tolist()
               for n in torch.randint(20, 250, (batch,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with_graphs, eager = both_ways(engine, prompts, params)
    for a, b in zip(with_graphs, eager, strict=True):
        assert a.output_ids == b.output_ids
    assert engine.pages.num_free == engine.pages.num_pages


def test_padded_graph_decode_matches_eager_logprobs(engine):
    """5 decodes replay the 8-bucket: their logprobs agree with eager ones to bf16 precision."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128256, (int(n),), generator=g).tolist()
               for n in torch.randint(20, 250, (5,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=5)
    with_graphs, eager = both_ways(engine, prompts, params)
    for a, b in zip(with_graphs, eager, strict=True):
        assert a.output_ids[0] == b.output_ids[0]  # from the (eager) prefill in both runs
        first, second = a.logprobs[1], b.logprobs[1]  # the decode step's top-5
        common = first.keys() & second.keys()
        assert len(common) >= 3
        assert max(abs(first[t] - second[t]) for t in common) < 0.1


def test_decodes_launched_ahead_equal_step_by_step(engine, monkeypatch):
    """Graph decodes launched before the previous tokens are read back give the tokens of steps run one by one."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128256, (int(n),), generator=g).tolist()
               for n in torch.randint(20, 250, (6,), generator=g)]
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True)
              for n in torch.randint(8, 40, (6,), generator=g)]
    taken = []
    step = engine.runner.step
    monkeypatch.setattr(engine.runner, "step", lambda plan: taken.append(plan.from_ahead) or step(plan))

    def run() -> list[list[int]]:
        seqs = [engine.add_request(p, sp, str(i))[0] for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        while engine.has_unfinished():
            engine.step()
        return [s.output_ids for s in seqs]

    ahead = run()
    assert sum(taken) > len(taken) // 2, taken  # most steps took the decode launched ahead
    monkeypatch.setattr(engine.scheduler, "_ahead", lambda batch: [])
    assert run() == ahead
    assert engine.pages.num_free == engine.pages.num_pages
