"""What `LLM.generate` and `LLM.chat` return, in vLLM's shapes: one RequestOutput per prompt holding its n samples,
and each sampled token's logprobs as Logprob objects."""

from dataclasses import dataclass, field

from tritium.engine.sequence import Sequence
from tritium.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability under the raw logits, its rank in the vocabulary (1: the most likely) and its text
    (None without a tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample: its text ("" without a tokenizer), token ids, and logprobs when they were asked for. A request
    that failed inside the engine (the others went on) has finish_reason "error" and says why in `error`."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # per generated token: {token id: Logprob}, most likely first
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop token id or stop string; None for end-of-sequence or length
    error: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the text prompt when one was given (for chat, the rendered conversation)
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)  # the samples, in index order
    # With SamplingParams.prompt_logprobs k: per prompt token its Logprob and the top k's, None for the first token.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


def completion_output(seq: Sequence, tokenizer: Tokenizer | None) -> CompletionOutput:
    """A finished sequence as the CompletionOutput `LLM` returns."""
    asked = seq.params.logprobs is not None
    return CompletionOutput(index=seq.index, text=seq.text, token_ids=list(seq.output_ids),
                            cumulative_logprob=seq.cumulative_logprob if asked else None,
                            logprobs=_logprobs(seq, tokenizer) if asked else None, finish_reason=seq.finish_reason,
                            stop_reason=seq.stop_reason, error=seq.error)


def prompt_logprobs(seq: Sequence, tokenizer: Tokenizer | None) -> list[dict[int, Logprob] | None]:
    """A sequence's prompt logprobs ({token id: (logprob, rank)} per prompt token) as Logprob objects."""
    decode = _decoder(tokenizer)
    return [None if entry is None else {t: Logprob(v, rank, decode(t)) for t, (v, rank) in entry.items()}
            for entry in seq.prompt_logprobs]


def _decoder(tokenizer: Tokenizer | None):
    return (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else (lambda t: None)


def _logprobs(seq: Sequence, tokenizer: Tokenizer | None) -> list[dict[int, Logprob]]:
    """Logprob objects of each position: the top k rank 1..k in order; the chosen token, where it is not among
    them, carries its own rank in the vocabulary."""
    decode = _decoder(tokenizer)
    k = seq.params.logprobs
    return [{t: Logprob(v, i + 1 if i < k else chosen_rank, decode(t)) for i, (t, v) in enumerate(entry.items())}
            for entry, chosen_rank in zip(seq.logprobs, seq.sampled_ranks)]
