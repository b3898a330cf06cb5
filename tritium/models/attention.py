"""The model's one door to attention: rotate the step's new q/k, write k/v into the paged cache, then attend.

The engine fills an `AttentionMetadata` once per step; every layer passes it here with its own cache.
Two backends compute the same function: "triton" (Tritium's unified kernel, the GPU path, or the
interpreter on a CPU) and "reference" (plain PyTorch, the quick path on a CPU).
"""

from dataclasses import dataclass, field

import torch

from tritium.ops import rotary_and_cache
from tritium.ops.attention import PreparedAttention, prepare_attention, window_size
from tritium.ops.attention.reference import attention_reference

BACKENDS = ("triton", "reference")


@dataclass
class AttentionMetadata:
    """The batch layout of one forward step over the paged KV cache (vLLM's convention)."""

    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]: sequence i owns query tokens cu[i]:cu[i+1]
    seqused_k: torch.Tensor  # int32 [num_seqs]: cached tokens of each sequence after this step's writes
    block_table: torch.Tensor  # int32 [num_seqs, max_pages]
    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each new token, -1 for padding
    max_seqlen_q: int
    max_seqlen_k: int
    backend: str = "triton"
    # The step's prepared kernel calls, one per kind of layer (window, soft-cap, scale): checked and planned at the
    # first layer, launched as they are at the others.
    prepared: dict[tuple, PreparedAttention] = field(default_factory=dict)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, sliding_window: int | None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q [tokens, q_heads, d], k/v [tokens, kv_heads, d], not yet rotated -> [tokens, q_heads, d], causal, over the
    last `sliding_window` keys if given, logits soft-capped at `softcap` if positive. q is rotated in place;
    rotated k and v go into the caches, from which both backends read every key."""
    rotary_and_cache(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping)
    window = window_size(sliding_window)
    if meta.backend == "triton":
        out = torch.empty_like(q)
        call = meta.prepared.get((window, scale, softcap))
        if call is None:
            call = meta.prepared[(window, scale, softcap)] = prepare_attention(
                q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.max_seqlen_q, meta.seqused_k, meta.max_seqlen_k,
                scale, True, window, meta.block_table, softcap, None, None, None)
        return call.run(q, k_cache, v_cache, out)
    out, _ = attention_reference(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seqused_k, meta.block_table, scale,
                                 window_size=window, softcap=softcap, dtype=torch.float32)
    return out.to(q.dtype)
