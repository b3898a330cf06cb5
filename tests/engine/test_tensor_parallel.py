"""Tensor parallelism on the CPU: two ranks, each its own process, over gloo (tritium/engine/worker_group.py,
worker.py). Their tokens equal one rank's on the demo model, and transformers' on a tiny Qwen3 folder with one KV
head (so both ranks hold it) saved as a sharded safetensors index; a rank that dies or raises ends the engine with
EngineDeadError naming it, in seconds, and leaves no process; a shutdown leaves none either. Ranks started by
torchrun (the several-host launch, here on one host) join an engine that waits for them."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.models.test_llama import save_family
from tritium import LLM, SamplingParams, default_model_path
from tritium.engine.errors import EngineDeadError
from tritium.engine.sampling_params import StructuredOutputsParams
from tritium.engine.step_plan import SeqStep, StepPlan

PROMPTS = ["The for statement", "A list comprehension", "Return the number of"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pids: list[int], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.05)
    return all(gone(p) for p in pids)


def test_demo_model_two_ranks_equal_one():
    """Greedy, seeded and constrained requests: penalties, logit_bias and min_tokens, prompt logprobs, and a regex
    (its mask filled by the engine, the sampling of decodes launched ahead deferred until it comes)."""
    prompts = PROMPTS + ["Exceptions"]
    requests = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=12, logprobs=2, ignore_eos=True),
                SamplingParams(temperature=0, max_tokens=10, frequency_penalty=0.6, presence_penalty=0.3,
                               logit_bias={15: -5.0}, min_tokens=6, prompt_logprobs=2),
                SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(
                    regex=r"(ab|cd){2,5}"))]
    one = LLM(default_model_path()).generate(prompts, requests, use_tqdm=False)
    llm = LLM(default_model_path(), tensor_parallel_size=2)
    pids = llm.engine.runner.pids
    two = llm.generate(prompts, requests, use_tqdm=False)
    for a, b in zip(one, two, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (x.token_ids, x.text) == (y.token_ids, y.text)
            for lp_x, lp_y in zip(x.logprobs or [], y.logprobs or [], strict=True):
                assert lp_x.keys() == lp_y.keys()
                assert max(abs(lp_x[t].logprob - lp_y[t].logprob) for t in lp_x) < 1e-4
    assert re.fullmatch(r"(ab|cd){2,5}", two[3].outputs[0].text)
    assert one[2].prompt_logprobs[0] is None and len(one[2].prompt_logprobs) == len(one[2].prompt_token_ids)
    for x, y in zip(one[2].prompt_logprobs[1:], two[2].prompt_logprobs[1:], strict=True):
        assert x.keys() == y.keys()
        assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 and x[t].rank == y[t].rank for t in x)
    assert llm.engine.pages.num_free == llm.engine.pages.num_pages
    llm.engine.shutdown()
    assert wait_gone(pids, 1.0)  # shutdown waited for them


@pytest.fixture(scope="module")
def qwen3_sharded(tmp_path_factory) -> tuple:
    """(folder of a tiny Qwen3 with one KV head in several safetensors files, prompts, transformers' greedy
    tokens)."""
    path = tmp_path_factory.mktemp("qwen3_tp")
    hf = save_family("qwen3", tmp_path_factory.mktemp("qwen3"))
    assert hf.config.num_key_value_heads == 1
    hf.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 96, (int(n),), generator=g).tolist() for n in (11, 14, 9, 6)]
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    return path, prompts, expected


@pytest.fixture(scope="module")
def qwen3_llm(qwen3_sharded):
    """Two ranks with a token budget that chunks prefills and a page pool that forces preemption."""
    llm = LLM(str(qwen3_sharded[0]), tensor_parallel_size=2, skip_tokenizer_init=True, block_size=4,
              max_num_batched_tokens=8, num_kv_pages=8, max_model_len=32)
    yield llm
    llm.engine.shutdown()


def test_one_kv_head_on_two_ranks_equals_transformers(qwen3_sharded, qwen3_llm):
    _, prompts, expected = qwen3_sharded
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = qwen3_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert qwen3_llm.engine.scheduler.num_preemptions > 0
    assert qwen3_llm.engine.pages.num_free == qwen3_llm.engine.pages.num_pages


def test_a_rank_that_raises_stops_all(qwen3_sharded):
    llm = LLM(str(qwen3_sharded[0]), tensor_parallel_size=2, skip_tokenizer_init=True, block_size=4)
    pids = llm.engine.runner.pids
    bad = StepPlan([SeqStep(0, 0, [1, 2], [10**6], SamplingParams(), False, None)])  # a page far past the pool
    with pytest.raises(EngineDeadError, match="tensor-parallel rank [01] failed:(.|\n)*IndexError"):
        llm.engine.runner.step(bad)
    assert wait_gone(pids)
    with pytest.raises(EngineDeadError):  # and it stays dead
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=2), use_tqdm=False)


def test_a_killed_rank_ends_generate_within_30_s(qwen3_llm):
    engine = qwen3_llm.engine
    pids = engine.runner.pids
    seqs = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), "r")
    engine.step()
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=f"rank 1 \\(pid {pids[1]}\\) died \\(killed by SIGKILL\\)"):
        while engine.has_unfinished():
            engine.step()
    assert time.monotonic() - start < 30
    assert wait_gone(pids)
    assert [s.finish_reason for s in seqs] == ["error"] and engine.abort("r") == []  # ended with the engine
    with pytest.raises(EngineDeadError):
        engine.add_request([5, 6], SamplingParams(max_tokens=2))
        engine.step()


def test_ranks_that_torchrun_starts_join_the_engine(qwen3_sharded, monkeypatch):
    path, prompts, expected = qwen3_sharded
    monkeypatch.setenv("TRITIUM_RANK_KEY", "a shared secret")
    engine_port, rendezvous_port = free_port(), free_port()
    torchrun = subprocess.Popen([
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rendezvous_port}",
        "-m", "tritium.engine.worker", "--engine", f"127.0.0.1:{engine_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        llm = LLM(str(path), tensor_parallel_size=2, ranks_address=f"127.0.0.1:{engine_port}",
                  skip_tokenizer_init=True, block_size=4)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        llm.engine.shutdown()
        assert torchrun.wait(timeout=60) == 0, torchrun.stdout.read()
    finally:
        torchrun.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
