"""Runs the model on one step's plan: lays the batch out over the paged KV cache, then samples (on rank 0: under
tensor parallelism every rank runs the same plan on its shard, and rank 0 samples from the gathered logits)."""

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tritium import distributed
from tritium.engine.config import EngineConfig
from tritium.engine.cuda_graphs import DecodeGraphs, fill_rows
from tritium.engine.logits_processors import LogitsProcessors
from tritium.engine.sampler import Sampled, sample
from tritium.engine.step_plan import SeqStep, StepPlan
from tritium.engine.warm_up import TABLE_ALIGN, warm_up_model
from tritium.models.attention import AttentionMetadata
from tritium.models.llama import LlamaForCausalLM

# cuBLAS without a workspace picks matrix-vector kernels that need no split-K reduction launch: a single-stream 8B
# decode step on an H100 took 6.19-6.30 ms instead of 6.37-6.51 (docs/benchmarks.md). cuBLAS reads this at the
# process's first call; a value the user set wins.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
PROMPT_LOGPROB_ROWS = 256  # prompt positions per log-softmax: 256 x a 128k vocabulary is 128 MiB of float32

PromptLogprob = dict[int, tuple[float, int]] | None  # {token id: (logprob, rank)}; None for the first prompt token


@dataclass
class StepOutput:
    """What a step gives the engine (on rank 0; the other ranks' is empty)."""

    # seq_id -> (token, its logprobs, its rank in the vocabulary; both None unless logprobs were asked for)
    sampled: dict[int, tuple[int, dict[int, float] | None, int | None]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[PromptLogprob]] = field(default_factory=dict)  # seq_id -> the step's new entries


class Launched:
    """A step on its way through the device: the sequences that sample in it, in row order, and its samples (rank 0
    only). Sampling may be deferred (`sample` a callable of the rows' grammar bitmask): it then runs when the samples
    are first asked for, with the bitmask given to `masks` meanwhile."""

    def __init__(self, rows: list[SeqStep], sample: Sampled | Callable[[torch.Tensor | None], Sampled] | None,
                 ) -> None:
        self.rows = rows
        self._sampled, self._deferred = (None, sample) if callable(sample) else (sample, None)
        self.masks: torch.Tensor | None = None

    @property
    def sampled(self) -> Sampled | None:
        if self._deferred is not None:
            self._sampled, self._deferred = self._deferred(self.masks), None
        return self._sampled

    def results(self) -> dict[int, tuple[int, dict[int, float] | None, int | None]]:
        """(token, its logprobs, its rank) by seq_id, as `Sampled.result` gives them."""
        if self.sampled is None:  # nothing sampled (every sequence ran a prefill chunk), or not rank 0
            return {}
        return {r.seq_id: (t, lp, rank) for r, t, lp, rank in zip(self.rows, *self.sampled.result(), strict=True)}


class ModelRunner:
    """Owns this rank's KV cache (its KV heads); runs decode steps through CUDA graphs on a GPU with the Triton
    backend (the reference backend reads lengths on the host) unless config.enforce_eager, every other step eagerly.

    A plan may launch the next decode of some of its sequences ahead (the scheduler decides which and gave them
    their pages): fed on the device with the tokens being sampled now and queued before those are read back, so
    the device does not wait for the host between steps. A later plan that says `from_ahead` takes it. One that
    does not drops it: its K/V writes, past what each sequence had cached, in pages the sequence owned, are never
    read.

    A step launched ahead whose rows include a structured-output one has its forward queued at once but its
    sampling deferred to the next `step`: the grammar mask depends on the token sampled before it, which only the
    host can feed to the matcher, and the next plan brings the mask. The forward still overlaps the host's work
    (reading the tokens, advancing the matchers, filling the next mask); only the sampling waits for the host.
    Penalties need no such wait: their counts are updated on the device (LogitsProcessors)."""

    def __init__(self, model: LlamaForCausalLM, num_pages: int, config: EngineConfig, max_model_len: int,
                 eos_ids: set[int] = frozenset()) -> None:
        attn = model.model.layers[0].self_attn
        self.model, self.num_pages, self.page_size = model, num_pages, config.block_size
        self.device = device = model.lm_head.weight.device
        self.backend = config.attention_backend or ("triton" if device.type == "cuda" else "reference")
        shape = (num_pages, self.page_size, attn.num_kv_heads, attn.head_dim)
        kv_dtype = config.torch_kv_dtype(model.lm_head.weight.dtype)
        self.kv_caches = [tuple(torch.empty(shape, dtype=kv_dtype, device=device) for _ in "kv")
                          for _ in range(model.config.num_layers)]
        self.generators: dict[int, torch.Generator] = {}
        self.processors = LogitsProcessors(model.config.vocab_size, device, eos_ids)
        max_seqs = config.max_num_seqs
        # The fp8 scales are measured on the first step, before it writes a page: every page then holds one scale's
        # values. That step runs eagerly (a captured graph never measures).
        self.calculate_kv_scales = config.calculate_kv_scales
        if self.backend == "triton" and device.type == "cuda":  # the interpreter compiles nothing
            warm_up_model(model, self.kv_caches[0], config.max_num_batched_tokens, max_seqs)
        self.graphs = None
        # Every rank captures the same sizes in the same order, all-reduces included (NCCL's can be captured).
        if (not config.enforce_eager and device.type == "cuda" and self.backend == "triton"
                and distributed.graph_capturable()):
            self.graphs = DecodeGraphs(model, self.kv_caches, max_seqs, -(-max_model_len // self.page_size),
                                       self.page_size)
        self.ahead: Launched | None = None

    def sizes(self) -> dict[str, int]:
        """What a decode step reads on this rank: its weights (weight_bytes: the dense ones and the MoE experts'),
        and the K/V bytes of one cached token."""
        dense, experts = weight_bytes(self.model)
        k_cache = self.kv_caches[0][0]
        kv = 2 * len(self.kv_caches) * k_cache[0, 0].numel() * k_cache.element_size()
        return {"weight_bytes": dense, "expert_bytes": experts, "kv_bytes_per_token": kv}

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        """Run the plan: the sampled token (and its logprobs if asked) of each sequence whose context is done, and
        the prompt logprobs its rows give. Launches the next decode of the plan's `ahead` sequences before waiting
        for this step's tokens."""
        out = StepOutput()
        launched, self.ahead = self.ahead, None
        if not plan.from_ahead:
            launched = self._launch(plan, out)
        elif launched is None:
            raise RuntimeError("the plan takes a decode launched ahead, but none was launched")
        else:
            launched.masks = self._masks(plan, launched.rows)  # for its sampling, if deferred
        if plan.ahead:
            self.ahead = self._launch_ahead(plan, launched)
        results = launched.results()
        out.sampled = {s.seq_id: results[s.seq_id] for s in plan.seqs if s.seq_id in results}
        return out

    def release(self, seq_ids: list[int]) -> None:
        """Forget ended sequences' sampling state (random streams, penalty rows). A decode launched ahead for one of
        them may still sample, for nothing: it then draws no seeded token and counts no penalty."""
        gone = set(seq_ids)
        for row in self.ahead.rows if self.ahead is not None else ():
            if row.seq_id in gone:
                row.finish_reason = "released"
        for seq_id in seq_ids:
            self.generators.pop(seq_id, None)
            self.processors.release(seq_id)

    def _launch(self, plan: StepPlan, out: StepOutput) -> Launched:
        ids, positions, slots, cu, used = [], [], [], [0], []
        for s in plan.seqs:
            ids += s.tokens
            for p in range(s.start, s.end):
                positions.append(p)
                slots.append(s.pages[p // self.page_size] * self.page_size + p % self.page_size)
            cu.append(cu[-1] + len(s.tokens))
            used.append(s.end)
        hidden = self._forward(ids, positions, slots, cu, used, [s.pages for s in plan.seqs],
                               max(len(s.tokens) for s in plan.seqs))
        for i, s in enumerate(plan.seqs):
            if s.prompt_logprobs_done is not None:
                entries = self._prompt_logprobs(s, hidden[cu[i]:cu[i + 1]])
                if entries is not None:
                    out.prompt_logprobs[s.seq_id] = entries
        done = [i for i, s in enumerate(plan.seqs) if s.samples]
        if not done:
            return Launched([], None)
        last_rows = [cu[i + 1] - 1 for i in done]
        # The last rows are distinct and increasing: as many as the rows means every row, in order (a decode batch).
        if len(last_rows) != hidden.shape[0]:
            hidden = hidden[last_rows]
        rows = [plan.seqs[i] for i in done]
        return Launched(rows, self._sample(self.model.logits(hidden), rows, [s.end - 1 for s in rows],
                                           self._masks(plan, rows)))

    def _launch_ahead(self, plan: StepPlan, launched: Launched) -> Launched:
        """The decode of each of the plan's `ahead` sequences at position start + its tokens, its input token the
        one `launched` samples for it (broadcast from rank 0 to the other ranks, on the device)."""
        tokens = launched.sampled.tokens if launched.sampled is not None else None
        if distributed.world_size() > 1:
            if tokens is None:
                tokens = torch.empty(len(launched.rows), dtype=torch.long, device=self.device)
            distributed.broadcast(tokens)
        row_of = {r.seq_id: i for i, r in enumerate(launched.rows)}
        rows = [plan.seqs[i] for i in plan.ahead]
        picked = [row_of[r.seq_id] for r in rows]
        if picked != list(range(len(launched.rows))):
            tokens = tokens[torch.tensor(picked, device=tokens.device)]
        positions = [r.end for r in rows]
        tables = [r.pages for r in rows]
        slots = [t[p // self.page_size] * self.page_size + p % self.page_size for t, p in zip(tables, positions)]
        hidden = self._forward(tokens, positions, slots, list(range(len(rows) + 1)), [p + 1 for p in positions],
                               tables, 1)
        logits = self.model.logits(hidden)  # now: a CUDA graph's output is overwritten by its next replay
        if logits is None:  # not rank 0
            return Launched(rows, None)
        if any(r.params.structured_outputs is not None for r in rows):
            return Launched(rows, lambda masks: self._sample(logits, rows, positions, masks))
        return Launched(rows, self._sample(logits, rows, positions, None))

    def _masks(self, plan: StepPlan, rows: list[SeqStep]) -> torch.Tensor | None:
        """The plan's grammar bitmask rows of `rows` (a row it does not hold allows every token), on the device."""
        if plan.bitmask is None or not rows:
            return None
        index = {s.seq_id: i for i, s in enumerate(plan.seqs)}
        padded = torch.cat([plan.bitmask, torch.full_like(plan.bitmask[:1], -1)])  # its last row allows every token
        picked = torch.tensor([index.get(r.seq_id, len(plan.seqs)) for r in rows])
        return padded[picked].to(self.device, non_blocking=True)

    def _sample(self, logits: torch.Tensor | None, rows: list[SeqStep], positions: list[int],
                masks: torch.Tensor | None) -> Sampled | None:
        """Sample the rows' next tokens (rank 0; the others, holding no logits, take part in gathering them only)."""
        if logits is None:
            return None
        chosen_from = self.processors.apply(logits, rows, positions, masks)
        sampled = sample(chosen_from, [r.params for r in rows], [self._generator(r) for r in rows], raw=logits)
        self.processors.record(rows, sampled.tokens)
        return sampled

    def _prompt_logprobs(self, s: SeqStep, hidden: torch.Tensor) -> list[PromptLogprob] | None:
        """The logprobs of the prompt tokens that the sequence's rows (positions start...) predict and that it still
        lacks: {token id: (logprob, rank)} of the top k and of the prompt token itself (rank 1 is the likeliest), of
        the raw logits; the first prompt token's entry is None. None on ranks other than 0."""
        entries: list[PromptLogprob] = [] if s.prompt_logprobs_done else [None]
        k = s.params.prompt_logprobs
        first = max(s.prompt_logprobs_done, 1) - 1 - s.start  # the row predicting the next missing prompt token
        last = min(hidden.shape[0], len(s.prompt_ids) - 1 - s.start)
        for lo in range(max(first, 0), last, PROMPT_LOGPROB_ROWS):
            hi = min(lo + PROMPT_LOGPROB_ROWS, last)
            logits = self.model.logits(hidden[lo:hi])
            if logits is None:
                continue
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(s.prompt_ids[s.start + lo + 1:s.start + hi + 1], device=logprobs.device)
            own = logprobs.gather(1, targets[:, None])
            ranks = (logprobs > own).sum(dim=-1).add_(1).tolist()
            values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
            for target, lp, rank, top_ids, top_values in zip(targets.tolist(), own.squeeze(1).tolist(), ranks, ids,
                                                             values):
                entry = {t: (v, r) for r, (t, v) in enumerate(zip(top_ids, top_values), 1)}
                entry.setdefault(target, (lp, rank))
                entries.append(entry)
        return entries if distributed.rank() == 0 else None

    def _forward(self, ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], cu: list[int],
                 used: list[int], tables: list[list[int]], max_seqlen_q: int) -> torch.Tensor:
        """Hidden states of the batch's tokens: a captured graph for decodes, else the eager forward."""
        measure, self.calculate_kv_scales = self.calculate_kv_scales, False
        if self.graphs is not None and max_seqlen_q == 1 and self.graphs.bucket(len(used)) is not None and not measure:
            return self.graphs.forward(ids, positions, slots, used, tables)
        width = -(-max(len(t) for t in tables) // TABLE_ALIGN) * TABLE_ALIGN
        table = torch.zeros(len(tables), width, dtype=torch.int32)
        fill_rows(table, tables)
        to = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            cu_seqlens_q=to(cu, torch.int32), seqused_k=to(used, torch.int32), block_table=table.to(self.device),
            slot_mapping=to(slots, torch.int64), max_seqlen_q=max_seqlen_q, max_seqlen_k=max(used),
            backend=self.backend, calculate_kv_scales=measure)
        ids = ids if isinstance(ids, torch.Tensor) else to(ids, torch.long)
        return self.model(ids, to(positions, torch.long), meta, self.kv_caches)

    def _generator(self, row: SeqStep) -> torch.Generator | None:
        if row.seed is None or row.finish_reason is not None:
            return None  # (an ended sequence in a deferred sampling: its generator was released, its token dropped)
        if row.seq_id not in self.generators:
            # Each of a request's samples has its own stream, so they differ and still reproduce.
            self.generators[row.seq_id] = torch.Generator(self.device).manual_seed(row.seed)
        return self.generators[row.seq_id]


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the weights every decode step reads, bytes of the MoE experts'). The embedding counts only when
    tied to the LM head (a lookup reads a few rows)."""
    dense = experts = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and not model.config.tie_word_embeddings:
            continue
        if ".experts." in name:
            experts += p.numel() * p.element_size()
        else:
            dense += p.numel() * p.element_size()
    return dense, experts
