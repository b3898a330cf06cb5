"""Megatron-style tensor-parallel layers. Each rank holds a slice of each weight and names the slice of the full
(Hugging Face) tensor it reads, so the loader reads only that slice from the safetensors files.

- ColumnParallelLinear: output features split (q/k/v, gate/up): no communication.
- RowParallelLinear: input features split (o, down): one all-reduce of the output.
- VocabParallelEmbedding: vocabulary rows split; each rank looks up its own ids, an all-reduce sums the rows.
- ParallelLMHead: vocabulary rows split; the logits are gathered on rank 0, which samples.

With one rank each layer is its plain counterpart. The rank and the number of ranks come from tritium.distributed,
read when the layer is made.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tritium import distributed
from tritium.models.config import ModelConfig

# A weight's part on this rank: (where it goes, a view of the local parameter; the dimension the full tensor is
# split along; where this rank's slice starts in it; the full tensor's size along that dimension).
Part = tuple[torch.Tensor, int, int, int]


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Raise ValueError naming the first of the model's sizes that `size` ranks cannot split."""
    if config.num_experts:
        raise ValueError(f"tensor parallelism does not split mixture-of-experts layers yet ({config.family})")
    heads, kv = config.num_heads, config.num_kv_heads
    if heads % size:
        raise ValueError(f"num_attention_heads ({heads}) is not divisible by tensor_parallel_size ({size})")
    if (kv % size if kv >= size else size % kv):
        raise ValueError(f"num_key_value_heads ({kv}) and tensor_parallel_size ({size}): one must divide the other")
    if config.intermediate_size % size:
        raise ValueError(f"intermediate_size ({config.intermediate_size}) is not divisible by tensor_parallel_size "
                         f"({size})")


def kv_heads_per_rank(num_kv_heads: int) -> tuple[int, int]:
    """(this rank's first KV head, how many it holds): the heads are split across ranks, and where there are fewer
    heads than ranks each head is held by world_size / num_kv_heads ranks."""
    size, rank = distributed.world_size(), distributed.rank()
    return rank * num_kv_heads // size, max(1, num_kv_heads // size)


class ColumnParallelLinear(nn.Linear):
    """Output features split across ranks. `parts` names the parts of a fused weight in order, each (first row of
    this rank's slice in the part's full tensor, rows it takes, the full tensor's rows); `shards` says where each
    part lies in the local weight: (first row, rows)."""

    def __init__(self, in_features: int, parts: dict[str, tuple[int, int, int]], bias: bool) -> None:
        super().__init__(in_features, sum(rows for _, rows, _ in parts.values()), bias=bias)
        self.sources = {name: (start, full) for name, (start, _, full) in parts.items()}
        self.shards, offset = {}, 0
        for name, (_, rows, _) in parts.items():
            self.shards[name] = (offset, rows)
            offset += rows

    def weight_part(self, param: str, shard: str | None) -> Part:
        if shard is None:  # the fused weight itself (a checkpoint saved by Tritium): it splits only into one rank
            if distributed.world_size() > 1:
                raise ValueError(f"a fused {param} cannot be split across ranks: give its separate projections")
            whole = getattr(self, param).data
            return whole, 0, 0, whole.shape[0]
        offset, rows = self.shards[shard]
        return (getattr(self, param).data.narrow(0, offset, rows), 0, *self.sources[shard])


class RowParallelLinear(nn.Linear):
    """Input features split evenly across ranks; the partial outputs are summed by one all-reduce (no bias)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        local = in_features // distributed.world_size()
        super().__init__(local, out_features, bias=False)
        self.start, self.full = distributed.rank() * local, in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(F.linear(x, self.weight))

    def weight_part(self, param: str, shard: None) -> Part:
        return self.weight.data, 1, self.start, self.full


class VocabParallelEmbedding(nn.Embedding):
    """Vocabulary rows split across ranks, ceil(vocab / ranks) each (the last rank's surplus rows are padding)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        size = distributed.world_size()
        local = -(-vocab_size // size)
        super().__init__(local, hidden_size)
        self.vocab_size, self.start = vocab_size, distributed.rank() * local
        self.rows = max(0, min(local, vocab_size - self.start))  # real (not padding) rows
        self.split = size > 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return super().forward(ids)
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        rows = F.embedding(local * mine, self.weight) * mine[:, None].to(self.weight.dtype)
        return distributed.all_reduce(rows)

    def weight_part(self, param: str, shard: None) -> Part:
        return self.weight.data.narrow(0, 0, self.rows), 0, self.start, self.vocab_size


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split like the embedding (and the same parameter when tied): forward(hidden) ->
    float32 logits [rows, vocab] on rank 0, None on the others."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = distributed.gather(F.linear(hidden, self.weight))
        return None if logits is None else logits[:, :self.vocab_size].float()
