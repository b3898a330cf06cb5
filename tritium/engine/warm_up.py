"""Compile, before the first request, every variant of the attention and MoE kernels that the engine's steps can
launch, so that no request waits for Triton's compiler (a second or two per variant on an H100 the first time,
then Triton's on-disk cache).

An attention variant is fixed by the launch config's compile-time fields, and the config by the batch's problem
class (query tokens per sequence, (sequence, KV head) programs), never by lengths; the layer's switches (a sliding
window, a soft-cap) are compiled in too. So a representative batch of each class the scheduler can build gives
every config, and one one-token launch per distinct variant and kind of layer compiles it. A MoE layer's config
follows from its shape and the step's token count rounded up to a power of two, so one one-token launch per
distinct config of those counts compiles its kernels.
"""

import dataclasses

import torch
import triton
from tqdm import tqdm

from tritium.models.llama import Attention
from tritium.models.moe import SparseMoE
from tritium.ops.attention import AttentionConfig, choose_config, unified_attention, window_size
from tritium.ops.kv_cache import FP8_KV_DTYPE
from tritium.ops.moe import MoEConfig, fused_moe
from tritium.ops.moe import choose_config as choose_moe_config

# Query tokens per sequence that reach every class: decode-q1/q2/q4/q8 (3 and 5 round up to 4 and 8), mixed
# (9 to 256) and prefill (more).
_TOKENS_PER_SEQ = (1, 2, 3, 4, 5, 8, 9, 257)
# Eager steps pad block tables to this many columns, so that the table's row stride (a kernel argument Triton
# specialises on: 1, a multiple of 16, or neither) is the same at every step.
TABLE_ALIGN = 16


def step_shapes(max_num_batched_tokens: int, max_num_seqs: int) -> list[tuple[int, int]]:
    """(query tokens, sequences) of a batch in each problem class a step can fall in."""
    seqs = sorted({min(1 << i, max_num_seqs) for i in range(max_num_seqs.bit_length() + 1)})
    return sorted({(n * s, s) for s in seqs for n in _TOKENS_PER_SEQ if n * s <= max_num_batched_tokens})


def variant(config: AttentionConfig) -> AttentionConfig:
    """The config with what Triton compiles in: num_splits is a runtime argument of both kernels, but whether it
    exceeds 1 (attention) and its next power of two (the split merge) are compiled in."""
    return dataclasses.replace(config, num_splits=triton.next_power_of_2(config.num_splits))


def attention_variants(device: torch.device, max_num_batched_tokens: int, max_num_seqs: int, num_q_heads: int,
                       num_kv_heads: int, head_dim: int, page_size: int, kv_fp8: bool = False) -> list[AttentionConfig]:
    """The distinct kernel variants of the configs every step shape gets (over fp8 K/V pages with `kv_fp8`)."""
    found = {variant(choose_config(device, t, s, num_q_heads, num_kv_heads, head_dim, page_size, kv_fp8)): None
             for t, s in step_shapes(max_num_batched_tokens, max_num_seqs)}
    return list(found)


def moe_variants(device: torch.device, max_num_batched_tokens: int, num_experts: int, top_k: int, hidden: int,
                 inter: int) -> list[MoEConfig]:
    """The distinct configs of a MoE layer's steps: one per power of two of tokens up to the budget's."""
    counts = [1 << i for i in range((max_num_batched_tokens - 1).bit_length() + 1)]
    return list({choose_moe_config(device, t, num_experts, top_k, hidden, inter): None for t in counts})


def warm_up_model(model: torch.nn.Module, kv_cache: tuple[torch.Tensor, torch.Tensor], max_num_batched_tokens: int,
                  max_num_seqs: int) -> None:
    """Compile the kernels of each kind of attention layer (window, soft-cap) and each MoE layer shape of `model`
    (all layers' caches are alike: one serves)."""
    kinds = {(m.num_heads, m.scale, m.sliding_window, m.softcap): m for m in model.modules()
             if isinstance(m, Attention)}
    for (num_heads, scale, window, softcap), attn in kinds.items():
        warm_up_attention(kv_cache, (attn.k_scale, attn.v_scale), num_heads, attn.qkv_proj.weight.dtype, scale,
                          window, softcap, max_num_batched_tokens, max_num_seqs)
    shapes = {m.experts.down_proj.shape + (m.top_k,): m for m in model.modules() if isinstance(m, SparseMoE)}
    for moe in shapes.values():
        warm_up_moe(moe, max_num_batched_tokens)


@torch.inference_mode()
def warm_up_attention(kv_cache: tuple[torch.Tensor, torch.Tensor], kv_scales: tuple[torch.Tensor, torch.Tensor],
                      num_q_heads: int, q_dtype: torch.dtype, scale: float, sliding_window: int | None,
                      softcap: float, max_num_batched_tokens: int, max_num_seqs: int) -> None:
    """Launch each variant once on a one-token batch over the real cache and scales (same strides and dtypes as the
    steps': the same specialisations), with queries in `q_dtype`, writing nothing."""
    k_cache, v_cache = kv_cache
    _, page_size, num_kv_heads, head_dim = k_cache.shape
    device = k_cache.device
    configs = attention_variants(device, max_num_batched_tokens, max_num_seqs, num_q_heads, num_kv_heads, head_dim,
                                 page_size, k_cache.dtype == FP8_KV_DTYPE)
    q = torch.randn(1, num_q_heads, head_dim, dtype=q_dtype, device=device)
    cu_seqlens_q = torch.tensor([0, 1], dtype=torch.int32, device=device)
    seqused_k = torch.ones(1, dtype=torch.int32, device=device)
    block_table = torch.zeros(1, TABLE_ALIGN, dtype=torch.int32, device=device)
    window = window_size(sliding_window)
    for config in tqdm(configs, desc="compiling attention", unit="variant", leave=False):
        unified_attention(q, k_cache, v_cache, torch.empty_like(q), cu_seqlens_q, 1, seqused_k, 1, scale, True,
                          window, block_table, softcap, None, *kv_scales, config=config)
    torch.cuda.synchronize(device)


@torch.inference_mode()
def warm_up_moe(moe: SparseMoE, max_num_batched_tokens: int) -> None:
    """Launch the layer's experts once per config its steps can get, on one token routed as the layer routes."""
    w13, w2 = moe.experts.gate_up_proj, moe.experts.down_proj
    num_experts, hidden, inter = w2.shape
    x = torch.randn(1, hidden, dtype=w2.dtype, device=w2.device)
    weights, ids = moe.route(x)
    for config in tqdm(moe_variants(w2.device, max_num_batched_tokens, num_experts, moe.top_k, hidden, inter),
                       desc="compiling experts", unit="variant", leave=False):
        fused_moe(x, w13, w2, weights, ids, config=config)
    torch.cuda.synchronize(w2.device)
