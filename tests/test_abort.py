"""LLMEngine.abort: a request's waiting or running sequences leave the scheduler and their pages go back at once."""

from tritium import SamplingParams, default_model_path
from tritium.engine.config import EngineConfig
from tritium.engine.llm_engine import LLMEngine


def test_abort_frees_running_and_waiting_sequences():
    engine = LLMEngine(default_model_path(), EngineConfig(max_num_seqs=2, max_model_len=256))
    idle = engine.pages.num_free
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, n=2)
    prompt = engine.tokenizer.encode("The for statement " * 5)
    first = engine.add_request(prompt, params, "a")
    second = engine.add_request(prompt[:7], params, "b")
    other = engine.add_request(prompt[:3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), "c")
    for _ in range(3):
        engine.step()
    assert {s.request_id for s in engine.scheduler.running} == {"a"}
    assert engine.pages.num_free < idle
    assert engine.abort("a") == first
    assert engine.abort("b") == second  # still waiting: max_num_seqs held it back
    assert engine.abort("a") == []
    assert all(s.finish_reason == "abort" and not s.pages for s in first + second)
    assert [s.request_id for s in engine.scheduler.waiting] == ["c"] and not engine.scheduler.running
    while engine.has_unfinished():
        engine.step()
    assert other[0].finish_reason == "length" and len(other[0].output_ids) == 4
    assert engine.pages.num_free == idle
