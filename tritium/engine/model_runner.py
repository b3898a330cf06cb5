"""Runs the model on one scheduled step: lays the batch out over the paged KV cache, then samples."""

import os
from collections.abc import Callable

import torch

from tritium.engine.cuda_graphs import DecodeGraphs, fill_rows
from tritium.engine.logits_processors import LogitsProcessors
from tritium.engine.sampler import Sampled, sample
from tritium.engine.sequence import Sequence
from tritium.engine.warm_up import TABLE_ALIGN, warm_up_model
from tritium.models.attention import AttentionMetadata
from tritium.models.llama import LlamaForCausalLM

# cuBLAS without a workspace picks matrix-vector kernels that need no split-K reduction launch: a single-stream 8B
# decode step on an H100 took 6.19-6.30 ms instead of 6.37-6.51 (docs/benchmarks.md). cuBLAS reads this at the
# process's first call; a value the user set wins.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
PROMPT_LOGPROB_ROWS = 256  # prompt positions per log-softmax: 256 x a 128k vocabulary is 128 MiB of float32


class Launched:
    """A step on its way through the device: which sequences sample in it, at which positions their query tokens
    sit (what the next schedule must ask for, to take a step that was launched ahead), and its samples. Sampling
    may be deferred (`sample` a callable): it then runs when the samples are first asked for."""

    def __init__(self, seqs: list[Sequence], positions: list[int],
                 sample: Sampled | Callable[[], Sampled] | None) -> None:
        self.seqs, self.positions = seqs, positions
        self._sampled, self._deferred = (None, sample) if callable(sample) else (sample, None)

    @property
    def sampled(self) -> Sampled | None:
        if self._deferred is not None:
            self._sampled, self._deferred = self._deferred(), None
        return self._sampled

    def serves(self, batch: list[tuple[Sequence, int]]) -> bool:
        """Whether this step computed every sequence of `batch` as it asks: a decode at the launched position."""
        launched = {seq.seq_id: pos for seq, pos in zip(self.seqs, self.positions, strict=True)}
        return all(n == 1 and launched.get(seq.seq_id) == seq.num_computed for seq, n in batch)

    def results(self) -> dict[int, tuple[int, dict[int, float] | None, int | None]]:
        """(token, its logprobs, its rank) by seq_id, as `Sampled.result` gives them."""
        if self.sampled is None:  # nothing sampled: every sequence ran a prefill chunk that is not its last
            return {}
        return {s.seq_id: (t, lp, r) for s, t, lp, r in zip(self.seqs, *self.sampled.result(), strict=True)}


class ModelRunner:
    """Owns the KV cache; runs decode steps through CUDA graphs when `cuda_graphs` (a GPU with the Triton backend:
    the reference backend reads lengths on the host), every other step eagerly.

    A step can be launched ahead: the next decode of the sequences that run on (the engine picks them), fed on the
    device with the tokens being sampled now and queued before those tokens are read back, so the device does not
    wait for the host between steps. The next `step` takes it when its batch is those decodes or some of them (a
    sequence that stopped or was aborted is left out). The engine admits no new sequence meanwhile and has reserved
    the pages, so the only other case is that all of them ended: then it is dropped, and its K/V writes, at a
    position past what each sequence had cached, in a page the sequence owned, are never read.

    A step launched ahead whose rows include a structured-output one has its forward queued at once but its
    sampling deferred to the next `step` call: the grammar mask depends on the token sampled before it, which only
    the host can feed to the matcher. The forward still overlaps the host's work (reading the tokens, advancing the
    matchers, filling the next mask); only the sampling waits for the host. Penalties need no such wait: their
    counts are updated on the device (LogitsProcessors)."""

    def __init__(self, model: LlamaForCausalLM, num_pages: int, page_size: int, backend: str, cuda_graphs: bool,
                 max_seqs: int, max_model_len: int, max_tokens: int, eos_ids: set[int] = frozenset()) -> None:
        cfg = model.config
        self.model, self.page_size, self.backend = model, page_size, backend
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [tuple(torch.empty(shape, dtype=dtype, device=device) for _ in "kv")
                          for _ in range(cfg.num_layers)]
        self.device = device
        self.generators: dict[int, torch.Generator] = {}
        self.processors = LogitsProcessors(cfg.vocab_size, device, eos_ids)
        if backend == "triton" and device.type == "cuda":  # the interpreter compiles nothing
            warm_up_model(model, self.kv_caches[0], max_tokens, max_seqs)
        self.graphs = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(model, self.kv_caches, max_seqs, -(-max_model_len // page_size), page_size)
        self.ahead: Launched | None = None

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]], ahead: list[Sequence] = ()
             ) -> dict[int, tuple[int, dict[int, float] | None]]:
        """Run `n` tokens of each sequence; returns (sampled token, its logprobs if asked) of each sequence whose
        context is done, by seq_id. Then launches the next decode of the `ahead` sequences (each samples in this
        step and holds a page for one more token) before waiting for this step's tokens."""
        launched, self.ahead = self.ahead, None
        if launched is None or not launched.serves(batch):
            launched = self._launch(batch)
        if ahead:
            self.ahead = self._launch_ahead(ahead, launched)
        results = launched.results()
        return {seq.seq_id: results[seq.seq_id] for seq, _ in batch if seq.seq_id in results}

    def _launch(self, batch: list[tuple[Sequence, int]]) -> Launched:
        ids, positions, slots, cu, used, tables = [], [], [], [0], [], []
        for seq, n in batch:
            start = seq.num_computed
            ids += seq.token_slice(start, start + n)
            for p in range(start, start + n):
                positions.append(p)
                slots.append(self._slot(seq, p))
            cu.append(cu[-1] + n)
            used.append(start + n)
            tables.append(seq.pages)
        hidden = self._forward(ids, positions, slots, cu, used, tables, max(n for _, n in batch))
        for i, (seq, _) in enumerate(batch):
            if seq.needs_prompt_logprobs:
                self._prompt_logprobs(seq, hidden[cu[i]:cu[i + 1]], seq.num_computed)
        done = [i for i, (seq, n) in enumerate(batch) if seq.num_computed + n == len(seq)]
        last_rows = [cu[i + 1] - 1 for i in done]
        # The last rows are distinct and increasing: as many as the rows means every row, in order (a decode batch).
        if len(last_rows) != hidden.shape[0]:
            hidden = hidden[last_rows]
        seqs = [batch[i][0] for i in done]
        positions = [len(s) - 1 for s in seqs]
        return Launched(seqs, positions, self._sample(self.model.logits(hidden), seqs, positions) if seqs else None)

    def _launch_ahead(self, seqs: list[Sequence], launched: Launched) -> Launched:
        """The decode of each of `seqs` at position len(seq), its input token the one `launched` samples for it."""
        tokens = launched.sampled.tokens
        if len(seqs) != len(launched.seqs):
            row = {s.seq_id: i for i, s in enumerate(launched.seqs)}
            tokens = tokens[torch.tensor([row[s.seq_id] for s in seqs], device=tokens.device)]
        positions = [len(s) for s in seqs]
        slots = [self._slot(s, p) for s, p in zip(seqs, positions, strict=True)]
        used = [p + 1 for p in positions]
        tables = [s.pages for s in seqs]
        hidden = self._forward(tokens, positions, slots, list(range(len(seqs) + 1)), used, tables, 1)
        logits = self.model.logits(hidden)  # now: a CUDA graph's output is overwritten by its next replay
        if any(s.grammar is not None for s in seqs):
            return Launched(seqs, positions, lambda: self._sample(logits, seqs, positions))
        return Launched(seqs, positions, self._sample(logits, seqs, positions))

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.pages[position // self.page_size] * self.page_size + position % self.page_size

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], positions: list[int]) -> Sampled:
        chosen_from = self.processors.apply(logits, seqs, positions)
        # A sequence that ended before a deferred sampling ran has released its generator: it draws unseeded, and its
        # token is dropped.
        generators = [self.generators.get(s.seq_id) for s in seqs]
        sampled = sample(chosen_from, [s.params for s in seqs], generators, raw=logits)
        self.processors.record(seqs, sampled.tokens)
        return sampled

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, start: int) -> None:
        """Append the logprobs of the prompt tokens that the chunk's rows (positions start...) predict: {token id:
        (logprob, rank)} of the top k and of the prompt token itself (rank 1 is the likeliest), of the raw logits;
        entry 0, for the first token, is None."""
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        k = seq.params.prompt_logprobs
        first = len(seq.prompt_logprobs) - 1 - start  # the row predicting the next missing prompt token
        last = min(hidden.shape[0], len(seq.prompt_ids) - 1 - start)
        for lo in range(max(first, 0), last, PROMPT_LOGPROB_ROWS):
            hi = min(lo + PROMPT_LOGPROB_ROWS, last)
            logprobs = torch.log_softmax(self.model.logits(hidden[lo:hi]), dim=-1)
            targets = torch.tensor(seq.prompt_ids[start + lo + 1:start + hi + 1], device=logprobs.device)
            own = logprobs.gather(1, targets[:, None])
            ranks = (logprobs > own).sum(dim=-1).add_(1).tolist()
            values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
            for target, lp, rank, top_ids, top_values in zip(targets.tolist(), own.squeeze(1).tolist(), ranks, ids,
                                                             values):
                entry = {t: (v, r) for r, (t, v) in enumerate(zip(top_ids, top_values), 1)}
                entry.setdefault(target, (lp, rank))
                seq.prompt_logprobs.append(entry)

    def _forward(self, ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], cu: list[int],
                 used: list[int], tables: list[list[int]], max_seqlen_q: int) -> torch.Tensor:
        """Hidden states of the batch's tokens: a captured graph for decodes, else the eager forward."""
        if self.graphs is not None and max_seqlen_q == 1 and self.graphs.bucket(len(used)) is not None:
            return self.graphs.forward(ids, positions, slots, used, tables)
        width = -(-max(len(t) for t in tables) // TABLE_ALIGN) * TABLE_ALIGN
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        fill_rows(table, tables)
        to = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            cu_seqlens_q=to(cu, torch.int32), seqused_k=to(used, torch.int32), block_table=table.to(self.device),
            slot_mapping=to(slots, torch.int64), max_seqlen_q=max_seqlen_q, max_seqlen_k=max(used),
            backend=self.backend)
        ids = ids if isinstance(ids, torch.Tensor) else to(ids, torch.long)
        return self.model(ids, to(positions, torch.long), meta, self.kv_caches)

    def prepare(self, seq: Sequence) -> None:
        """A new sequence's own sampling state, made as it is added (so that a failure is its request's alone): a
        seeded sample's random stream. Each of a request's samples has its own, so they differ and still reproduce
        (seed + index stays within what manual_seed takes: SamplingParams bounds seed to int64)."""
        if seq.params.seed is not None and not seq.params.greedy:
            self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seq.params.seed + seq.index)

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
        self.processors.release(seq)
