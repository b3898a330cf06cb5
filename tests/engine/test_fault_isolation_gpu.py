"""On a GPU: a real device fault (a device-side assert from an embedding index past the vocabulary, smuggled past
the checks) marks the engine dead with EngineDeadError and fails every request; and a request that fails in the
batched step on the GPU (CUDA graphs on) fails alone while the others' greedy tokens are unchanged. The fault runs
in a child process: it leaves the CUDA context unusable."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

DEVICE_FAULT = textwrap.dedent("""
    import torch
    from tritium import SamplingParams
    from tritium.engine.config import EngineConfig
    from tritium.engine.errors import EngineDeadError
    from tritium.engine.llm_engine import LLMEngine
    from tritium import default_model_path

    engine = LLMEngine(default_model_path(), EngineConfig(max_model_len=256, max_num_seqs=8))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    seqs = [s for i in range(3) for s in engine.add_request([1, 2, 3 + i], params, str(i))]
    engine.step()
    bad = engine.add_request([5, 6, 7], params, "bad")[0]
    bad.prompt_ids[1] = 10**7  # past the vocabulary, as no request can send it
    try:
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        print("NO FAULT")
    except EngineDeadError as exc:
        assert engine.dead is exc and all(s.finish_reason == "error" for s in seqs + [bad]), exc
        assert not engine.has_unfinished()
        print("DEAD:", exc)
""")


def test_a_device_fault_marks_the_engine_dead():
    run = subprocess.run([sys.executable, "-c", DEVICE_FAULT], capture_output=True, text=True, timeout=600)
    assert "DEAD:" in run.stdout, run.stdout + run.stderr[-3000:]


def test_a_request_failing_in_the_batched_step_fails_alone_on_the_gpu(monkeypatch):
    import tritium.engine.model_runner as model_runner
    from tritium import SamplingParams, default_model_path
    from tritium.engine.config import EngineConfig
    from tritium.engine.llm_engine import LLMEngine

    # float32: greedy tokens that do not hang on how the batch was split
    engine = LLMEngine(default_model_path(), EngineConfig(dtype="float32", max_model_len=256, max_num_seqs=8))
    assert engine.runner.graphs is not None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[1, 2, 3 + i] for i in range(4)]

    def run(marked: bool) -> list[list[int]]:
        seqs = [engine.add_request(p, params, str(i))[0] for i, p in enumerate(prompts)]
        if marked:
            (failed,) = engine.add_request([9, 9, 9], SamplingParams(temperature=0.5, seed=4242, max_tokens=24), "m")
        while engine.has_unfinished():
            engine.step()
        assert not marked or (failed.finish_reason == "error" and "injected" in failed.error)
        return [s.output_ids for s in seqs]

    alone = run(False)
    sample = model_runner.sample

    def sample_refusing_the_marked(logits, params, generators, **kwargs):
        if any(p.seed == 4242 for p in params):
            raise ValueError("injected")
        return sample(logits, params, generators, **kwargs)

    monkeypatch.setattr(model_runner, "sample", sample_refusing_the_marked)
    assert run(True) == alone
    assert engine.pages.num_free == engine.pages.num_pages
