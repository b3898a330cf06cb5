"""What changes a step's logits before the next token is chosen, in vLLM's order, batched on the logits' device:
the structured-output mask, logit_bias, min_tokens (end-of-sequence and stop ids blocked), then the penalties.
Logprobs are still reported from the raw logits, as vLLM reports them.

Penalties need each sequence's token counts. A decode launched ahead samples on the device before the host has
read the token sampled before it, so the counts live on the device too (`PenaltyState`), updated there by every
step's sampled tokens; the host never builds them from its token lists. The grammar mask instead needs the host
(the matcher reads the last token): the engine fills it into the step's plan, and the runner defers the sampling
of a step launched ahead whose rows have a grammar until the next plan brings their mask (see ModelRunner).

A row is anything with the sequence's `seq_id`, `params`, `prompt_ids` (for penalties and min_tokens) and
`finish_reason`: a plan's SeqStep in the engine, a Sequence in the tests."""

import torch

from tritium.engine.structured import apply_bitmask


class PenaltyState:
    """For each penalized sequence, a row of output-token counts and a row of prompt-token flags on the device.
    A row lives as long as the sequence (through preemption) and is zeroed on the device when it is reused, after
    any update a dropped step may still have queued for its previous owner."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.row_of: dict[int, int] = {}
        self.free: list[int] = []

    def rows(self, seqs: list) -> torch.Tensor:
        """The sequences' rows (given one on first sight) as an index tensor on the device."""
        return torch.tensor([self._row(s) for s in seqs], device=self.device)

    def _row(self, seq) -> int:
        row = self.row_of.get(seq.seq_id)
        if row is not None:
            return row
        if not self.free:
            grown = max(8, 2 * self.counts.shape[0])
            self.free = list(range(grown - 1, self.counts.shape[0] - 1, -1))
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grown - self.counts.shape[0], self.vocab_size)])
            self.in_prompt = torch.cat([self.in_prompt,
                                        self.in_prompt.new_zeros(grown - self.in_prompt.shape[0], self.vocab_size)])
        row = self.row_of[seq.seq_id] = self.free.pop()
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        self.in_prompt[row, torch.tensor(seq.prompt_ids, device=self.device)] = True
        return row

    def apply(self, logits: torch.Tensor, batch_rows: torch.Tensor, state_rows: torch.Tensor, params: list) -> None:
        """Penalize logits[batch_rows] in place (vLLM's formulas): repetition over prompt and output tokens, then
        frequency times the output count, presence once per output token seen."""
        column = lambda name: torch.tensor([getattr(p, name) for p in params], dtype=logits.dtype,  # noqa: E731
                                           device=logits.device)[:, None]
        counts = self.counts[state_rows]
        seen = counts > 0
        rows = logits[batch_rows]
        if any(p.repetition_penalty != 1 for p in params):
            penalty = torch.where(seen | self.in_prompt[state_rows], column("repetition_penalty"), 1.0)
            rows = torch.where(rows > 0, rows / penalty, rows * penalty)
        rows -= column("frequency_penalty") * counts + column("presence_penalty") * seen
        logits[batch_rows] = rows

    def record(self, state_rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the sampled tokens (on the device: they may not have reached the host yet)."""
        self.counts.index_put_((state_rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def release(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        if row is not None:
            self.free.append(row)


class LogitsProcessors:
    """The rules a step's rows ask for, applied to a copy of the logits; rows that ask for none cost nothing, and a
    batch where none asks returns the logits as they are."""

    def __init__(self, vocab_size: int, device: torch.device, eos_ids: set[int]) -> None:
        self.vocab_size, self.device, self.eos_ids = vocab_size, device, sorted(eos_ids)
        self.penalties = PenaltyState(vocab_size, device)

    def apply(self, logits: torch.Tensor, seqs: list, positions: list[int], bitmask: torch.Tensor | None = None,
              ) -> torch.Tensor:
        """The logits the choice is made from; `positions[i]` is the position of row i's last input token (its
        output count before this token is positions[i] + 1 - prompt length); `bitmask` (one row per row, on the
        device) the tokens the rows' grammars allow."""
        params = [s.params for s in seqs]
        grammar = bitmask is not None
        bias = [i for i, p in enumerate(params) if p.logit_bias]
        blocked = [i for i, (s, pos) in enumerate(zip(seqs, positions))
                   if s.params.min_tokens and s.params.structured_outputs is None
                   and pos + 1 - len(s.prompt_ids) < s.params.min_tokens]
        penalized = _penalized(seqs)
        if not (grammar or bias or blocked or penalized):
            return logits
        logits = logits.clone()
        if grammar:
            apply_bitmask(logits, bitmask)
        if bias:
            rows, tokens, values = [], [], []
            for i in bias:
                for token, value in params[i].logit_bias.items():
                    rows.append(i)
                    tokens.append(token)
                    values.append(value)
            index = (torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device))
            logits.index_put_(index, torch.tensor(values, dtype=logits.dtype, device=self.device), accumulate=True)
        if blocked:
            self._block_stops(logits, [seqs[i] for i in blocked], blocked)
        if penalized:
            state_rows = self.penalties.rows([seqs[i] for i in penalized])
            batch_rows = torch.tensor(penalized, device=self.device)
            self.penalties.apply(logits, batch_rows, state_rows, [params[i] for i in penalized])
        return logits

    def _block_stops(self, logits: torch.Tensor, seqs: list, rows: list[int]) -> None:
        """Sequences short of min_tokens may not end: their end-of-sequence (unless ignored) and stop ids are out."""
        index_rows, index_tokens = [], []
        for row, seq in zip(rows, seqs):
            stops = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else set(self.eos_ids))
            stops = [t for t in stops if t < self.vocab_size]
            index_rows += [row] * len(stops)
            index_tokens += stops
        if index_tokens:
            logits[torch.tensor(index_rows, device=self.device), torch.tensor(index_tokens, device=self.device)] = \
                float("-inf")

    def record(self, seqs: list, tokens: torch.Tensor) -> None:
        """After sampling: count the tokens of the penalized rows on the device."""
        penalized = _penalized(seqs)
        if penalized:
            rows = tokens if len(penalized) == len(seqs) else tokens[torch.tensor(penalized, device=tokens.device)]
            self.penalties.record(self.penalties.rows([seqs[i] for i in penalized]), rows)

    def release(self, seq_id: int) -> None:
        self.penalties.release(seq_id)


def _penalized(seqs: list) -> list[int]:
    """Rows that need penalty counts. A sequence that ended (or was aborted) before a deferred sampling ran has
    given its row back: it samples unpenalized, and its token is dropped anyway."""
    return [i for i, s in enumerate(seqs) if s.params.penalized and s.finish_reason is None]
