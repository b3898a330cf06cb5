"""Runs the model on one scheduled step: lays the batch out over the paged KV cache, then samples."""

import torch

from tritium.engine.cuda_graphs import DecodeGraphs, fill_rows
from tritium.engine.sampler import sample
from tritium.engine.sequence import Sequence
from tritium.models.attention import AttentionMetadata
from tritium.models.llama import LlamaForCausalLM


class ModelRunner:
    """Owns the KV cache; runs decode steps through CUDA graphs when `cuda_graphs` (a GPU with the Triton backend:
    the reference backend reads lengths on the host), every other step eagerly."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, backend: str, cuda_graphs: bool,
                 max_seqs: int, max_model_len: int) -> None:
        cfg = model.config
        self.model, self.block_size, self.backend = model, block_size, backend
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [tuple(torch.empty(shape, dtype=dtype, device=device) for _ in "kv")
                          for _ in range(cfg.num_layers)]
        self.device = device
        self.generators: dict[int, torch.Generator] = {}
        self.graphs = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(model, self.kv_caches, max_seqs, -(-max_model_len // block_size), block_size)

    @torch.inference_mode()
    def step(self, batch: list[tuple[Sequence, int]]) -> dict[int, tuple[int, dict[int, float] | None]]:
        """Run `n` tokens of each sequence; returns (sampled token, its logprobs if asked) of each sequence whose
        context is done, by seq_id."""
        ids, positions, slots, cu, used, tables = [], [], [], [0], [], []
        for seq, n in batch:
            start = seq.num_computed
            ids += seq.token_slice(start, start + n)
            for p in range(start, start + n):
                positions.append(p)
                slots.append(seq.block_table[p // self.block_size] * self.block_size + p % self.block_size)
            cu.append(cu[-1] + n)
            used.append(start + n)
            tables.append(seq.block_table)
        if self.graphs is not None and cu[-1] == len(batch) and self.graphs.bucket(len(batch)) is not None:
            hidden = self.graphs.forward(ids, positions, slots, used, tables)
        else:
            hidden = self._forward(ids, positions, slots, cu, used, tables, max(n for _, n in batch))
        done = [i for i, (seq, n) in enumerate(batch) if seq.num_computed + n == len(seq)]
        if not done:
            return {}
        last_rows = [cu[i + 1] - 1 for i in done]
        # The last rows are distinct and increasing: as many as the rows means every row, in order (a decode batch).
        logits = self.model.logits(hidden if len(last_rows) == hidden.shape[0] else hidden[last_rows])
        seqs = [batch[i][0] for i in done]
        tokens, logprobs = sample(logits, [s.params for s in seqs], [self._generator(s) for s in seqs])
        return {s.seq_id: (t, lp) for s, t, lp in zip(seqs, tokens, logprobs, strict=True)}

    def _forward(self, ids: list[int], positions: list[int], slots: list[int], cu: list[int], used: list[int],
                 tables: list[list[int]], max_seqlen_q: int) -> torch.Tensor:
        """The eager forward of any batch."""
        table = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.int32)
        fill_rows(table, tables)
        to = lambda x, dtype: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            cu_seqlens_q=to(cu, torch.int32), seqused_k=to(used, torch.int32), block_table=table.to(self.device),
            slot_mapping=to(slots, torch.int64), max_seqlen_q=max_seqlen_q, max_seqlen_k=max(used),
            backend=self.backend)
        return self.model(to(ids, torch.long), to(positions, torch.long), meta, self.kv_caches)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        if seq.seq_id not in self.generators:
            # Each of a request's samples has its own stream, so they differ and still reproduce.
            self.generators[seq.seq_id] = torch.Generator(self.device).manual_seed(seq.params.seed + seq.index)
        return self.generators[seq.seq_id]

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)
