"""A sampled token into its sequence: the token and its logprobs, its text (detokenized incrementally), and the stop
checks (the grammar's end, stop token ids, end of sequence, max_tokens, stop strings once min_tokens are out, the text
cut before a stop string)."""

from tritium.engine.sequence import Sequence


def record_token(seq: Sequence, token: int, logprobs: dict[int, float] | None, rank: int | None,
                 eos_ids: set[int]) -> str | None:
    """Append a sampled token, its logprobs (and its rank in the vocabulary) and its text; returns why the
    sequence ends here, if it does."""
    p = seq.params
    seq.output_ids.append(token)
    if logprobs is not None:
        seq.logprobs.append(logprobs)
        seq.sampled_ranks.append(rank)
        seq.cumulative_logprob += logprobs[token]
    reason = None
    if seq.grammar is not None and (not seq.grammar.accept_token(token) or seq.grammar.is_terminated()):
        # The grammar ended on an end-of-sequence token (even with ignore_eos: nothing may follow). A token it
        # refuses cannot have been sampled under its mask; should one be, the output ends rather than break it.
        reason = "stop"
    elif token in p.stop_token_ids:
        reason, seq.stop_reason = "stop", token
    elif not p.ignore_eos and token in eos_ids:
        reason = "stop"
    elif len(seq.output_ids) >= p.max_tokens:
        reason = "length"
    if seq.detokenizer is None:
        return reason
    # A stop token's own text is left out, as a stop string's is.
    text = seq.detokenizer.add(token) if reason != "stop" or p.include_stop_str_in_output else ""
    if reason:
        text += seq.detokenizer.flush()
    start = len(seq.text)
    seq.text += text
    if len(seq.output_ids) < p.min_tokens:  # as vLLM: no stop string ends an output shorter than min_tokens
        return reason
    hit = _find_stop(seq.text, start, p.stop)
    if hit is None:
        return reason
    at, stop = hit
    seq.text = seq.text[:at + len(stop) if p.include_stop_str_in_output else at]
    seq.stop_reason = stop
    return "stop"


def _find_stop(text: str, start: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The first stop string in `text` that ends in its new part `text[start:]`: (where it begins, which)."""
    hits = [(at, s) for s in stops if (at := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits, key=lambda hit: (hit[0], len(hit[1]))) if hits else None
