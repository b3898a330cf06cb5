"""The model's one door to attention: rotate the step's new q/k, write k/v into the paged cache, then attend.

The engine fills an `AttentionMetadata` once per step; every layer passes it here with its own cache and scales.
Two backends compute the same function: "triton" (Tritium's unified kernel, the GPU path, or the
interpreter on a CPU) and "reference" (plain PyTorch, the quick path on a CPU).
"""

from dataclasses import dataclass, field

import torch

from tritium.ops import rotary_and_cache
from tritium.ops.attention import PreparedAttention, prepare_attention, window_size
from tritium.ops.attention.reference import attention_reference

BACKENDS = ("triton", "reference")
# --calculate-kv-scales maps the largest |k| and |v| of the first step to this, half of fp8 e4m3's 448: later
# tokens up to 2x larger still fit, and e4m3's relative precision is the same from 2^-6 * scale upwards.
KV_SCALE_TARGET = 224.0


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
    calculate_kv_scales: bool = False  # set each layer's fp8 K/V scales from this step's k and v before writing


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, sliding_window: int | None,
    softcap: float = 0.0, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [tokens, q_heads, d], k/v [tokens, kv_heads, d], not yet rotated -> [tokens, q_heads, d], causal, over the
    last `sliding_window` keys if given, logits soft-capped at `softcap` if positive. q is rotated in place;
    rotated k and v go into the caches, from which both backends read every key. An fp8 cache holds k / k_scale
    and v / v_scale (float32 [1] tensors, the layer's own; unused by a cache in the model's dtype)."""
    if meta.calculate_kv_scales:
        measure_kv_scales(k, v, k_scale, v_scale)
    rotary_and_cache(q, k, v, positions, cos_sin_cache, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    window = window_size(sliding_window)
    if meta.backend == "triton":
        out = torch.empty_like(q)
        call = meta.prepared.get((window, scale, softcap))
        if call is None:
            call = meta.prepared[(window, scale, softcap)] = prepare_attention(
                q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.max_seqlen_q, meta.seqused_k, meta.max_seqlen_k,
                scale, True, window, meta.block_table, softcap, None, k_scale, v_scale)
        return call.run(q, k_cache, v_cache, out, k_scale, v_scale)  # each layer's own scales
    out, _ = attention_reference(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seqused_k, meta.block_table, scale,
                                 window_size=window, softcap=softcap, k_scale=k_scale, v_scale=v_scale,
                                 dtype=torch.float32)
    return out.to(q.dtype)


def measure_kv_scales(k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Set the scales (in place, on the device: no host sync) so that the largest |k| and |v| of these tokens map
    to KV_SCALE_TARGET. k is measured before its rotation, by the length of each rotated pair (k[i], k[i + d/2]):
    no rotation makes an element larger than that."""
    half = k.shape[-1] // 2
    k_max = torch.sqrt(k[..., :half].float() ** 2 + k[..., half:].float() ** 2).amax()
    v_max = v.float().abs().amax()
    tiny = torch.finfo(torch.float32).tiny  # an all-zero k or v still gets a usable (positive) scale
    k_scale.copy_((k_max / KV_SCALE_TARGET).clamp(min=tiny).reshape(1))
    v_scale.copy_((v_max / KV_SCALE_TARGET).clamp(min=tiny).reshape(1))
