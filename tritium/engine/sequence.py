"""One sample of a request: its tokens, text and logprobs, and where it stands: waiting, running, finished."""

import enum
import itertools
from dataclasses import dataclass, field

from tritium.engine.sampling_params import SamplingParams
from tritium.engine.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    pages: list[int] = field(default_factory=list)  # page ids, in order
    num_computed: int = 0  # tokens whose K/V are in the cache (prefix hits included)
    page_hashes: list[int] = field(default_factory=list)  # prefix-cache names of its first full pages
    finish_reason: str | None = None  # "stop", "length", "abort", or "error" (then `error` says what failed)
    error: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    detokenizer: IncrementalDetokenizer | None = None  # None without a tokenizer: no text
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)  # filled when params.logprobs is set
    sampled_ranks: list[int] = field(default_factory=list)  # each chosen token's rank (1: most likely), likewise
    cumulative_logprob: float = 0.0
    # With params.prompt_logprobs: entry p for prompt token p, {token id: (logprob, rank)} of the top k and of the
    # token itself (None for the first), filled as prefill chunks run.
    prompt_logprobs: list[dict[int, tuple[float, int]] | None] = field(default_factory=list)
    grammar: object | None = None  # the structured-output matcher (xgrammar), advanced with each output token

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole token list (a decode step reads one token of it)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt tokens still lack their logprobs (their positions must run, not come from the cache)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self) - self.num_computed

    def reset_for_recompute(self) -> None:
        """Preempted: drop the cache and run prompt + outputs again as one prompt later."""
        self.pages = []
        self.num_computed = 0
        self.page_hashes = []
        self.status = Status.WAITING
