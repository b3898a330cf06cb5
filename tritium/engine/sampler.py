"""Next-token choice on the logits' device, one batched pass: greedy, or temperature with top-k, top-p and min-p
filters, on logits that the logits processors may have masked, biased and penalized first; and the logprobs a
request asks for (of the raw logits, before all of that, as vLLM reports them)."""

import torch

from tritium.engine.sampling_params import SamplingParams


class Sampled:
    """A step's sampled tokens on the device, and their copy on its way to the host: `result()` waits for that copy
    alone, not for work queued after it (the next step, launched meanwhile)."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, ks: list[int | None]) -> None:
        self.tokens = tokens  # [rows] int64 on the logits' device: the next step can read them there
        self.ks = ks
        tensors = [tokens]
        if any(k is not None for k in ks):
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = logprobs.gather(1, tokens[:, None])
            # The chosen token's rank in the vocabulary (1: the most likely), as vLLM reports it.
            tensors += [chosen.squeeze(1), (logprobs > chosen).sum(dim=-1) + 1,
                        *logprobs.topk(max(k or 0 for k in ks), dim=-1)]
        # A copy to the host with non_blocking lands in pinned memory and returns at once; the event says when.
        self._host = [t.to("cpu", non_blocking=True) for t in tensors]
        self._ready = None
        if tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self) -> tuple[list[int], list[dict[int, float] | None], list[int | None]]:
        """(token of each row, {token id: logprob} of the top `k` tokens in descending order plus the chosen token,
        last when it is not among them, for each row that asks, and the chosen token's rank in each such row)."""
        if self._ready is not None:
            self._ready.synchronize()
        token_list = self._host[0].tolist()
        if len(self._host) == 1:
            return token_list, [None] * len(self.ks), [None] * len(self.ks)
        chosen, ranks, top_values, top_ids = (t.tolist() for t in self._host[1:])
        out: list[dict[int, float] | None] = []
        for row, k in enumerate(self.ks):
            if k is None:
                out.append(None)
                continue
            entry = dict(zip(top_ids[row][:k], top_values[row][:k]))
            entry.setdefault(token_list[row], chosen[row])
            out.append(entry)
        return token_list, out, [r if k is not None else None for r, k in zip(ranks, self.ks)]


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           raw: torch.Tensor | None = None) -> Sampled:
    """One token per row of logits [rows, vocab] (float32), and the logprobs of the rows that ask for them, from
    `raw` (the logits before any processor; default `logits`)."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == len(params):
        tokens = _sample_rows(logits, params, generators)
    else:
        tokens = logits.argmax(dim=-1)
        if rows:
            _put(tokens, rows, _sample_rows, logits, params, generators)
    return Sampled(logits if raw is None else raw, tokens, [p.logprobs for p in params])


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 ) -> torch.Tensor:
    """Rows without top-k/top-p/min-p skip the vocabulary sort; which way a row goes depends on its own
    parameters only, so a seeded request draws the same token whatever else shares its batch."""
    needs_filter = [bool(p.top_k or p.min_p > 0 or p.top_p < 1) for p in params]
    filtered = [i for i, f in enumerate(needs_filter) if f]
    plain = [i for i, f in enumerate(needs_filter) if not f]
    if not filtered:
        return _sample_plain(logits, params, generators)
    if not plain:
        return _sample_filtered(logits, params, generators)
    out = torch.empty(len(params), dtype=torch.long, device=logits.device)
    for group, draw in ((filtered, _sample_filtered), (plain, _sample_plain)):
        _put(out, group, draw, logits, params, generators)
    return out


def _put(out: torch.Tensor, rows: list[int], draw, logits: torch.Tensor, params: list[SamplingParams],
         generators: list[torch.Generator | None]) -> None:
    """out[rows] = draw(the rows' logits, params, generators)."""
    index = torch.tensor(rows, device=logits.device)
    out[index] = draw(logits[index], [params[i] for i in rows], [generators[i] for i in rows])


def _sample_plain(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  ) -> torch.Tensor:
    # The race below in log space: argmax(p_i / E_i) = argmax(logits_i / T - log E_i), no softmax needed.
    return (_scaled(logits, params) - _noise(logits, generators).log_()).argmax(dim=-1)


def _scaled(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits / temperature, row by row."""
    temperatures = {p.temperature for p in params}
    if len(temperatures) == 1:  # the usual batch: one scalar, no host-to-device copy
        return logits / temperatures.pop()
    return logits / torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)[:, None]


def _noise(like: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """E ~ Exp(1) i.i.d. shaped like `like` (clamped above 0); each seeded row draws from its own generator, so it
    reproduces whatever else is in the batch."""
    noise = torch.empty_like(like).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _race(weights: torch.Tensor, generators: list[torch.Generator | None], keep: torch.Tensor) -> torch.Tensor:
    """argmax(w / E) with E ~ Exp(1) i.i.d. picks index i with probability w_i / sum(w), among the kept ones."""
    return torch.where(keep, weights / _noise(weights, generators), -1.0).argmax(dim=-1)


def _sample_filtered(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                     ) -> torch.Tensor:
    column = lambda values: torch.tensor(values, dtype=logits.dtype, device=logits.device)[:, None]  # noqa: E731
    vocab = logits.shape[-1]
    # Filters in rank order, each on what the previous left: top-k, then min-p, then top-p of the remaining mass.
    probs, order = torch.softmax(_scaled(logits, params), dim=-1).sort(dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab, device=logits.device) < column([p.top_k or vocab for p in params])
    keep &= probs >= column([p.min_p for p in params]) * probs[:, :1]
    kept = probs * keep
    mass_before = kept.cumsum(dim=-1) - kept
    top_p = column([p.top_p for p in params])
    keep &= (mass_before < top_p * kept.sum(dim=-1, keepdim=True)) | (top_p >= 1)  # rounding: 1 must keep all
    return order.gather(1, _race(probs, generators, keep)[:, None]).squeeze(1)
