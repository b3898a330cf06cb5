"""Engine updates -> OpenAI response bodies: whole responses and streamed chunks of completions and chat, with
usage and logprobs in OpenAI's two shapes (completions: parallel lists; chat: one entry per token)."""

import time
import uuid

from tritium.engine.tokenizer import Tokenizer
from tritium.server.async_engine import SeqUpdate


class Samples:
    """The n samples of one request as updates arrive: text, tokens, logprobs, and what has been streamed. Text
    that could still turn out to be the start of a stop string is held back until it cannot (as LLM.stream)."""

    def __init__(self, n: int, stops: tuple[str, ...]) -> None:
        self.text = [""] * n
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[dict[int, float]]] = [[] for _ in range(n)]
        self.finish_reason: list[str | None] = [None] * n
        self._sent = [0] * n
        self._hold = max((len(s) for s in stops), default=1) - 1

    def add(self, u: SeqUpdate) -> str:
        """Record an update; returns the sample's text that can be streamed now."""
        i = u.index
        self.text[i], self.finish_reason[i] = u.text, u.finish_reason
        self.token_ids[i] += u.new_token_ids
        self.logprobs[i] += u.new_logprobs
        end = len(u.text) if u.finish_reason else max(self._sent[i], len(u.text) - self._hold)
        delta, self._sent[i] = u.text[self._sent[i]:end], max(self._sent[i], end)
        return delta

    def usage(self, prompt_tokens: int) -> dict:
        completion = sum(len(ids) for ids in self.token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(rid: str, obj: str, model: str, choices: list[dict]) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: list[dict[int, float]], k: int, offset: int) -> dict:
    """The completions shape: tokens, their logprobs, the top k of each, and each token's offset in the text."""
    tokens = [_piece(tok, t) for t in ids]
    offsets = []
    for piece in tokens:
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": [lp[t] for t, lp in zip(ids, lps)],
            "top_logprobs": [{_piece(tok, a): v for a, v in list(lp.items())[:k]} for lp in lps],
            "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, ids: list[int], lps: list[dict[int, float]], k: int) -> dict:
    """The chat shape: per token its text, logprob, UTF-8 bytes and the top k alternatives."""
    def entry(t: int, v: float) -> dict:
        piece = _piece(tok, t)
        return {"token": piece, "logprob": v, "bytes": list(piece.encode())}

    return {"content": [{**entry(t, lp[t]), "top_logprobs": [entry(a, v) for a, v in list(lp.items())[:k]]}
                        for t, lp in zip(ids, lps)]}


def _piece(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)
