"""Engine updates -> a request's OpenAI answer: streamed chunks as they come, or the whole body at the end, for
/v1/completions (echo and prompt logprobs included) and /v1/chat/completions (forced tool calls included)."""

from collections.abc import AsyncIterator

from tritium.engine.tokenizer import Tokenizer
from tritium.server import responses as wire
from tritium.server.async_engine import SeqUpdate
from tritium.server.protocol import ChatCompletionRequest, CompletionRequest
from tritium.server.responses import Samples, envelope, response_id


class CompletionAnswer:
    """Choice i is prompt i // n, sample i % n. With echo, a choice's first text begins with its prompt's (and its
    logprobs with the prompt tokens')."""

    def __init__(self, tok: Tokenizer, model: str, body: CompletionRequest, prompts: list[list[int]],
                 stops: tuple[str, ...]) -> None:
        self.id, self.tok, self.model, self.body, self.prompts = response_id("cmpl"), tok, model, body, prompts
        self.samples = Samples(len(prompts) * body.n, stops)
        self.texts = [p if isinstance(p, str) else None for p in body.prompts()]
        self.echoed = [False] * len(self.samples.text)

    def _choice(self, i: int, text: str, new_ids: list[int], new_lps: list[dict], offset: int) -> dict:
        body, tok, k = self.body, self.tok, self.body.logprobs
        ids, prompt_lps = self.prompts[i // body.n], self.samples.prompt_logprobs[i]
        lps = wire.completion_logprobs(tok, new_ids, new_lps, k, offset) if k is not None else None
        out = {"index": i, "text": text, "logprobs": lps, "finish_reason": self.samples.finish_reason[i]}
        if body.echo and not self.echoed[i]:  # the prompt goes before the choice's first text
            self.echoed[i] = True
            prompt_text = self.texts[i // body.n] if self.texts[i // body.n] is not None else tok.decode(ids)
            out["text"] = prompt_text + text
            if lps is not None:
                lps["text_offset"] = [o + len(prompt_text) for o in lps["text_offset"]]
                out["logprobs"] = wire.join_logprobs(wire.echo_logprobs(tok, ids, prompt_lps, k), lps)
        if body.prompt_logprobs is not None and prompt_lps is not None:
            out["prompt_logprobs"] = wire.prompt_logprobs_body(tok, prompt_lps)
            self.samples.prompt_logprobs[i] = None  # sent
        return out

    async def chunks(self, updates: AsyncIterator[list[SeqUpdate]]) -> AsyncIterator[dict]:
        async for step in updates:
            choices = []
            for u in step:
                offset = len(self.samples.text[u.index])
                delta = self.samples.add(u)
                choices.append(self._choice(u.index, delta, u.new_token_ids, u.new_logprobs, offset))
            yield envelope(self.id, "text_completion", self.model, choices)
        if self.body.include_usage:
            yield {**envelope(self.id, "text_completion", self.model, []), "usage": self._usage()}

    def whole(self) -> dict:
        s = self.samples
        choices = [self._choice(i, s.text[i], s.token_ids[i], s.logprobs[i], 0) for i in range(len(s.text))]
        return {**envelope(self.id, "text_completion", self.model, choices), "usage": self._usage()}

    def _usage(self) -> dict:
        return self.samples.usage(sum(map(len, self.prompts)))


class ChatAnswer:
    """A stream opens with the role. A reply that tool_choice forces (`forced`: its kind and the schema its text
    matches) goes out as tool calls once its sample is done."""

    def __init__(self, tok: Tokenizer, model: str, body: ChatCompletionRequest, prompt_ids: list[int],
                 stops: tuple[str, ...], forced: tuple[str, object] | None) -> None:
        self.id, self.tok, self.model, self.body, self.forced = response_id("chatcmpl"), tok, model, body, forced
        self.prompt_tokens = len(prompt_ids)
        self.samples = Samples(body.n, stops)
        self.k = (body.top_logprobs or 0) if body.logprobs else None
        self.tool = body.tool_choice.function.name if forced and forced[0] == "named" else None

    def _logprobs(self, new_ids: list[int], new_lps: list[dict]) -> dict | None:
        return wire.chat_logprobs(self.tok, new_ids, new_lps, self.k) if self.k is not None else None

    def _message(self, i: int, content: str) -> tuple[dict, str | None]:
        """The reply (text, or the forced tool calls once the sample is done) and its finish_reason."""
        reason = self.samples.finish_reason[i]
        if self.forced is None or reason is None:
            return {"content": content}, reason
        try:
            calls = wire.tool_calls(self.forced[0], self.samples.text[i], self.tool)
        except (ValueError, TypeError, KeyError):  # cut short by max_tokens: the text as it is
            return {"content": self.samples.text[i]}, reason
        return {"content": None, "tool_calls": calls}, "tool_calls" if self.forced[0] == "required" else reason

    def _extras(self) -> dict:
        if self.body.prompt_logprobs is None or self.samples.prompt_logprobs[0] is None:
            return {}
        return {"prompt_logprobs": wire.prompt_logprobs_body(self.tok, self.samples.prompt_logprobs[0])}

    async def chunks(self, updates: AsyncIterator[list[SeqUpdate]]) -> AsyncIterator[dict]:
        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(self.body.n)]
        yield envelope(self.id, "chat.completion.chunk", self.model, roles)
        sent_extras = False
        async for step in updates:
            choices = []
            for u in step:
                text = self.samples.add(u)  # a forced tool call is sent whole, once its sample is done
                delta, reason = self._message(u.index, text if self.forced is None else "")
                for j, call in enumerate(delta.get("tool_calls") or ()):
                    call["index"] = j
                choices.append({"index": u.index, "delta": delta,
                                "logprobs": self._logprobs(u.new_token_ids, u.new_logprobs), "finish_reason": reason})
            chunk = envelope(self.id, "chat.completion.chunk", self.model, choices)
            if not sent_extras and self._extras():
                chunk, sent_extras = {**chunk, **self._extras()}, True
            yield chunk
        if self.body.include_usage:
            yield {**envelope(self.id, "chat.completion.chunk", self.model, []),
                   "usage": self.samples.usage(self.prompt_tokens)}

    def whole(self) -> dict:
        s, choices = self.samples, []
        for i in range(self.body.n):
            reply, reason = self._message(i, s.text[i])
            choices.append({"index": i, "message": {"role": "assistant", **reply},
                            "logprobs": self._logprobs(s.token_ids[i], s.logprobs[i]), "finish_reason": reason})
        return {**envelope(self.id, "chat.completion", self.model, choices),
                "usage": s.usage(self.prompt_tokens), **self._extras()}
