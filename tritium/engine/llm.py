"""`LLM`: offline batched generation, shaped like vLLM's (`generate` returns `RequestOutput`s in order)."""

from dataclasses import dataclass, field

from tqdm import tqdm

from tritium.engine.llm_engine import LLMEngine
from tritium.engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """LLM(model_dir, **engine options); see `LLMEngine` for the options (dtype, block_size, max_model_len,
    max_num_batched_tokens, max_num_seqs, enable_prefix_caching, num_kv_blocks, gpu_memory_utilization)."""

    def __init__(self, model: str, **engine_options) -> None:
        self.engine = LLMEngine(model, **engine_options)

    def generate(self, prompts: list, params: SamplingParams | None = None, use_tqdm: bool = True,
                 ) -> list[RequestOutput]:
        """Prompts are {"prompt_token_ids": [...]} dicts (text prompts arrive with tokenizer support)."""
        params = params or SamplingParams()
        token_lists = []
        for i, p in enumerate(prompts):
            if not isinstance(p, dict) or "prompt_token_ids" not in p:
                raise ValueError(f"prompt {i}: give {{'prompt_token_ids': [...]}}; text prompts need a tokenizer, "
                                 "which this version does not load yet")
            token_lists.append(list(p["prompt_token_ids"]))
            self.engine.check_request(token_lists[-1], params)  # every prompt checked before any is queued
        seqs = [self.engine.add_request(ids, params, str(i)) for i, ids in enumerate(token_lists)]
        with tqdm(total=len(seqs), desc="generating", unit="request", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                bar.update(len(self.engine.step()))
        return [RequestOutput(s.request_id, None, s.prompt_ids,
                              [CompletionOutput(0, "", list(s.output_ids), s.finish_reason)]) for s in seqs]
