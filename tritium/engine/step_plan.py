"""One step, one plan: everything decided about a step, in plain lists, numbers and parameters, so that it can be
handed to the model runner in this process or pickled to every tensor-parallel rank.

The runner needs nothing else about a sequence: its new tokens, where they start, its pages, how it samples, and
what its sampling's rules read (its prompt, for penalties and min_tokens; the prompt logprobs it still lacks).
"""

from dataclasses import dataclass, field

import torch

from tritium.engine.sampling_params import SamplingParams
from tritium.engine.sequence import Sequence


@dataclass(slots=True)
class SeqStep:
    """One sequence in a step: it feeds `tokens` at positions start, start + 1, ..."""

    seq_id: int
    start: int  # tokens already in the cache
    tokens: list[int]
    pages: list[int]  # its pages, with those its tokens (and a decode launched ahead) fill
    params: SamplingParams
    samples: bool  # its context is complete in this step: its next token is sampled
    seed: int | None  # the seed of its own random stream (the request's seed + its sample index), if any
    # Its prompt, where its sampling reads it (penalties, min_tokens, prompt logprobs); else None.
    prompt_ids: list[int] | None = None
    prompt_logprobs_done: int | None = None  # with prompt logprobs still missing: how many it has (None first)
    finish_reason: str | None = None  # set by the runner when it is released before a deferred sampling runs

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class StepPlan:
    seqs: list[SeqStep]
    # Indices of the sequences whose next decode is launched before this step's tokens are read back: their input
    # token is the one sampled now, on the device. Each holds the page for that token already.
    ahead: list[int] = field(default_factory=list)
    # This step is the decode of some of the sequences launched ahead by the step before: the runner takes it.
    from_ahead: bool = False
    # The tokens each sequence may sample next, where a grammar constrains it: [len(seqs), ceil(vocab / 32)] int32 on
    # the host, bit t of row i for token t (rows without a grammar allow every token); None when none does.
    bitmask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.seqs)


def make_plan(batch: list[tuple[Sequence, int]], ahead: list[Sequence], from_ahead: bool) -> StepPlan:
    """The plan of a batch of (sequence, tokens to run), made once `ahead` has its pages. It holds the sequences'
    own page and prompt lists (no copies): a plan is run, or pickled, before the next schedule changes them."""
    seqs = []
    for seq, n in batch:
        start, p = seq.num_computed, seq.params
        samples = start + n == len(seq)
        reads_prompt = p.penalized or p.min_tokens > 0 or seq.needs_prompt_logprobs
        seqs.append(SeqStep(
            seq.seq_id, start, seq.token_slice(start, start + n), seq.pages, p, samples,
            p.seed + seq.index if p.seed is not None and not p.greedy else None,
            seq.prompt_ids if reads_prompt else None,
            len(seq.prompt_logprobs) if seq.needs_prompt_logprobs else None))
    index = {s.seq_id: i for i, s in enumerate(seqs)} if ahead else {}
    return StepPlan(seqs, [index[seq.seq_id] for seq in ahead], from_ahead)
