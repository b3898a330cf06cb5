"""`LLM`: offline batched generation shaped like vLLM's: text or token-id prompts, or chat conversations in;
one `RequestOutput` per prompt out, in order, holding its n samples."""

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from tritium.engine.bounds import check_unicode
from tritium.engine.config import EngineConfig
from tritium.engine.errors import RequestFailed
from tritium.engine.llm_engine import LLMEngine
from tritium.engine.outputs import RequestOutput, completion_output, prompt_logprobs
from tritium.engine.sampling_params import SamplingParams
from tritium.engine.tokenizer import Tokenizer

Prompt = str | dict  # "text", {"prompt": "text"} or {"prompt_token_ids": [...]}


class LLM:
    """LLM(model, **options): `model` is a Hugging Face model folder or Hub id (default: the demo model that ships
    with Tritium); the options are `EngineConfig`'s fields (dtype, block_size, max_model_len, seed, revision,
    max_num_batched_tokens, max_num_seqs, enable_prefix_caching, num_kv_pages, gpu_memory_utilization,
    enforce_eager, tokenizer, skip_tokenizer_init, tensor_parallel_size ...), as vLLM's LLM takes them. With
    skip_tokenizer_init=True prompts are token ids and outputs carry no text."""

    def __init__(self, model: str | Path | None = None, **options) -> None:
        from tritium import default_model_path

        self.engine = LLMEngine(default_model_path() if model is None else model, EngineConfig.from_options(**options))
        self._request_ids = itertools.count()

    @classmethod
    def from_config(cls, model: str | Path | None, config: EngineConfig) -> "LLM":
        """An LLM over an EngineConfig made elsewhere (the CLI builds one from its options)."""
        return cls(model, **dataclasses.asdict(config))

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
                 ) -> list[RequestOutput]:
        """One prompt or a list; `params` for all of them or one per prompt. All are checked before any is queued."""
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        requests = [self._parse(i, p) for i, p in enumerate(prompts)]
        return self._run(requests, self._per_prompt(params, len(requests)), use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation ([{"role": ..., "content": ...}, ...]) or a list of them, through the model's chat
        template; one RequestOutput per conversation."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        requests = [self._chat_request(c, add_generation_prompt) for c in conversations]
        return self._run(requests, self._per_prompt(params, len(requests)), use_tqdm)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """What a call without SamplingParams uses: the model folder's generation_config.json defaults
        (temperature, top_k, top_p, min_p, max_new_tokens), else SamplingParams' own, under `overrides`."""
        return self.engine.default_sampling_params(**overrides)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        """One conversation as the token-id prompt `generate` takes (what `chat` sends for it)."""
        return {"prompt_token_ids": self._chat_request(messages, add_generation_prompt)[1]}

    def _chat_request(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[int]]:
        tokenizer = self._tokenizer("chat")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt)
        # The template writes the special tokens itself: none are added on encoding (as transformers and vLLM do).
        return text, tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt (one sample), yielding its text as it grows. The tail that could still turn out
        to be the start of a stop string is held back until it cannot, so the pieces join to the final text."""
        params = params or self.default_sampling_params()
        if params.n != 1:
            raise ValueError(f"stream gives one sample; got n={params.n}")
        _, ids = self._parse(0, prompt)
        self._tokenizer("streaming text")
        (seq,) = self.engine.add_request(ids, params, str(next(self._request_ids)))
        hold = max((len(s) for s in params.stop), default=1) - 1
        sent = 0
        try:
            while seq.finish_reason is None:
                self.engine.step()
                if seq.finish_reason == "error":
                    raise RequestFailed(seq.error)
                end = len(seq.text) if seq.finish_reason else max(sent, len(seq.text) - hold)
                if end > sent:
                    yield seq.text[sent:end]
                    sent = end
        finally:  # a caller that stops reading leaves nothing running
            self.engine.abort(seq.request_id)

    def _parse(self, i: int, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of one prompt."""
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"])
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise ValueError(f"prompt {i}: give a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}")
        check_unicode(f"prompt {i}", text)
        return text, self._tokenizer(f"prompt {i} is text, which").encode(text)

    def _tokenizer(self, what: str) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, but this LLM was made with skip_tokenizer_init=True: "
                             "give prompts as {'prompt_token_ids': [...]}")
        return self.engine.tokenizer

    def _per_prompt(self, params: SamplingParams | list[SamplingParams] | None, count: int) -> list[SamplingParams]:
        if isinstance(params, list):
            if len(params) != count:
                raise ValueError(f"{len(params)} SamplingParams for {count} prompts: give one, or one per prompt")
            return params
        return [params or self.default_sampling_params()] * count

    def _run(self, requests: list[tuple[str | None, list[int]]], params: list[SamplingParams], use_tqdm: bool,
             ) -> list[RequestOutput]:
        for (_, ids), p in zip(requests, params):
            self.engine.check_request(ids, p)  # every request checked before any is queued
        queued = []
        try:
            for (text, ids), p in zip(requests, params):
                request_id = str(next(self._request_ids))
                queued.append((RequestOutput(request_id, text, ids), self.engine.add_request(ids, p, request_id)))
        except Exception:
            for out, _ in queued:  # all or none: a later call must not run these
                self.engine.abort(out.request_id)
            raise
        total = sum(len(seqs) for _, seqs in queued)
        with tqdm(total=total, desc="generating", unit="sequence", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                bar.update(len(self.engine.step()))
        for out, seqs in queued:
            out.outputs = [completion_output(s, self.engine.tokenizer) for s in seqs]
            if seqs[0].params.prompt_logprobs is not None:
                out.prompt_logprobs = prompt_logprobs(seqs[0], self.engine.tokenizer)
        return [out for out, _ in queued]
