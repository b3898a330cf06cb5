"""On one GPU: two tensor-parallel ranks sharing it, over gloo (TRITIUM_TP_SHARE_GPU=1, a test-only set-up), run the
sharded GPU path (the Triton kernels on each rank's heads, the vocabulary gathered for sampling) and give one rank's
tokens and logprobs in float32: on the demo model, and on a tiny Qwen3 whose one KV head both ranks hold."""

import pytest
import torch

from tests.models.test_llama import save_family
from tritium import LLM, SamplingParams, default_model_path

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

# Both ranks on one GPU: a fixed page pool (each would otherwise size its pool from the same free memory); no
# auto-tune (each rank count has its own head counts: its own classes to tune).
OPTIONS = {"dtype": "float32", "num_kv_pages": 512, "max_num_seqs": 16, "auto_tune": False}


def run(folder, tp: int, prompts: list, params: list[SamplingParams], monkeypatch, **options) -> list:
    if tp > 1:
        monkeypatch.setenv("TRITIUM_TP_SHARE_GPU", "1")
    llm = LLM(str(folder), tensor_parallel_size=tp, **OPTIONS, **options)
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()


def assert_same(one: list, two: list) -> None:
    for a, b in zip(one, two, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert x.token_ids == y.token_ids
            for lp_x, lp_y in zip(x.logprobs or [], y.logprobs or [], strict=True):
                common = lp_x.keys() & lp_y.keys()
                assert len(common) >= len(lp_x) - 1
                assert max(abs(lp_x[t].logprob - lp_y[t].logprob) for t in common) < 1e-3


def test_demo_model_two_ranks_on_one_gpu_equal_one(monkeypatch):
    prompts = ["The for statement", "A list comprehension", "Return the number of", "Exceptions"]
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=3)] * 3
    params.append(SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=32, ignore_eos=True))
    one = run(default_model_path(), 1, prompts, params, monkeypatch)
    assert_same(one, run(default_model_path(), 2, prompts, params, monkeypatch))


def test_one_kv_head_on_two_ranks_on_one_gpu(tmp_path, monkeypatch):
    save_family("qwen3", tmp_path)
    g = torch.Generator().manual_seed(9)
    prompts = [{"prompt_token_ids": torch.randint(0, 96, (int(n),), generator=g).tolist()} for n in (3, 40, 17, 90)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    options = {"skip_tokenizer_init": True, "max_num_batched_tokens": 64}  # chunked prefills and mixed batches
    assert_same(run(tmp_path, 1, prompts, params, monkeypatch, **options),
                run(tmp_path, 2, prompts, params, monkeypatch, **options))
