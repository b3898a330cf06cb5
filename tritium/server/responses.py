"""The pieces of OpenAI response bodies: a request's samples as updates arrive, envelopes, usage, logprobs in
OpenAI's two shapes (completions: parallel lists; chat: one entry per token), prompt logprobs, tool calls.
answers.py puts them together."""

import json
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
        self.prompt_logprobs: list[list | None] = [None] * n
        self._sent = [0] * n
        self._hold = max((len(s) for s in stops), default=1) - 1

    def add(self, u: SeqUpdate) -> str:
        """Record an update; returns the sample's text that can be streamed now."""
        i = u.index
        self.text[i], self.finish_reason[i] = u.text, u.finish_reason
        self.token_ids[i] += u.new_token_ids
        self.logprobs[i] += u.new_logprobs
        if u.prompt_logprobs is not None:
            self.prompt_logprobs[i] = u.prompt_logprobs
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


def echo_logprobs(tok: Tokenizer, prompt_ids: list[int], prompt_lps: list, k: int) -> dict:
    """The completions logprobs shape of an echoed prompt: the first token has no logprob (nothing precedes it)."""
    tokens = [_piece(tok, t) for t in prompt_ids]
    offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    token_logprobs = [None if lp is None else lp[t][0] for t, lp in zip(prompt_ids, prompt_lps)]
    top = [None if lp is None else {_piece(tok, a): v for a, (v, _) in list(lp.items())[:k]} for lp in prompt_lps]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def join_logprobs(first: dict, second: dict) -> dict:
    """Two completions logprobs objects one after the other (the echoed prompt's, then the output's)."""
    return {key: first[key] + second[key] for key in first}


def prompt_logprobs_body(tok: Tokenizer, prompt_lps: list) -> list:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}."""
    return [None if lp is None else {str(t): {"logprob": v, "rank": r, "decoded_token": _piece(tok, t)}
                                     for t, (v, r) in lp.items()} for lp in prompt_lps]


def tool_calls(kind: str, text: str, name: str | None) -> list[dict]:
    """OpenAI's tool_calls of a forced reply: a named function's arguments are the whole text; "required" replies
    are a JSON array of {"name", "parameters"} (the grammar made sure of it)."""
    calls = [(name, text)] if kind == "named" else [(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                                                     for c in json.loads(text)]
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
            for n, a in calls]


def chat_logprobs(tok: Tokenizer, ids: list[int], lps: list[dict[int, float]], k: int) -> dict:
    """The chat shape: per token its text, logprob, UTF-8 bytes and the top k alternatives."""
    def entry(t: int, v: float) -> dict:
        piece = _piece(tok, t)
        return {"token": piece, "logprob": v, "bytes": list(piece.encode())}

    return {"content": [{**entry(t, lp[t]), "top_logprobs": [entry(a, v) for a, v in list(lp.items())[:k]]}
                        for t, lp in zip(ids, lps)]}


def _piece(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)
