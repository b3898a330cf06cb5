"""`rotary_and_cache`: rotary position embedding of q and k fused with the paged KV-cache write of k and v."""

import torch
import triton
import triton.language as tl

from tritium.ops.kv_cache import FP8_KV_DTYPE, FP8_MAX, check_kv_scales, check_paged_caches, quantize_fp8

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rotary_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr,
    v_scale_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cos_sin,
    stride_k_block, stride_k_slot, stride_k_head_cache, stride_v_block, stride_v_slot, stride_v_head_cache,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF_DIM: tl.constexpr, HALF_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, QUANTIZE: tl.constexpr,
):
    # Each head is two halves [x1, x2] rotated as pairs (x1[i], x2[i]) by angle i: Hugging Face's rotate-half.
    token = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, HALF_PAD)
    in_half = offs_r < HALF_DIM
    row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * stride_cos_sin
    cos = tl.load(row + offs_r, mask=in_half)[None, :]
    sin = tl.load(row + HALF_DIM + offs_r, mask=in_half)[None, :]

    offs_q = tl.arange(0, Q_HEADS_PAD)
    q_mask = (offs_q < NUM_Q_HEADS)[:, None] & in_half[None, :]
    q_first = q_ptr + token * stride_q_token + offs_q[:, None] * stride_q_head + offs_r[None, :]
    q1 = tl.load(q_first, mask=q_mask).to(tl.float32)
    q2 = tl.load(q_first + HALF_DIM, mask=q_mask).to(tl.float32)
    tl.store(q_first, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_first + HALF_DIM, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return  # padding token: q is rotated (harmless), nothing goes to the cache
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_kv = tl.arange(0, KV_HEADS_PAD)
    kv_mask = (offs_kv < NUM_KV_HEADS)[:, None] & in_half[None, :]
    k_first = k_ptr + token * stride_k_token + offs_kv[:, None] * stride_k_head + offs_r[None, :]
    k1 = tl.load(k_first, mask=kv_mask).to(tl.float32)
    k2 = tl.load(k_first + HALF_DIM, mask=kv_mask).to(tl.float32)
    k_dst = k_cache_ptr + block * stride_k_block + offset * stride_k_slot + offs_kv[:, None] * stride_k_head_cache
    k_dst += offs_r[None, :]
    k_out1, k_out2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
    v_first = v_ptr + token * stride_v_token + offs_kv[:, None] * stride_v_head + offs_r[None, :]
    v1 = tl.load(v_first, mask=kv_mask)
    v2 = tl.load(v_first + HALF_DIM, mask=kv_mask)
    if QUANTIZE:  # an fp8 cache: x / scale, saturated (div_rn: correctly rounded, as torch divides)
        k_scale, v_scale = tl.load(k_scale_ptr), tl.load(v_scale_ptr)
        k_out1 = tl.clamp(tl.math.div_rn(k_out1, k_scale), -FP8_MAX, FP8_MAX)
        k_out2 = tl.clamp(tl.math.div_rn(k_out2, k_scale), -FP8_MAX, FP8_MAX)
        v1 = tl.clamp(tl.math.div_rn(v1.to(tl.float32), v_scale), -FP8_MAX, FP8_MAX)
        v2 = tl.clamp(tl.math.div_rn(v2.to(tl.float32), v_scale), -FP8_MAX, FP8_MAX)
    tl.store(k_dst, k_out1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(k_dst + HALF_DIM, k_out2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
    v_dst = v_cache_ptr + block * stride_v_block + offset * stride_v_slot + offs_kv[:, None] * stride_v_head_cache
    v_dst += offs_r[None, :]
    tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(v_dst + HALF_DIM, v2.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def rotary_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """The float32 table `rotary_and_cache` reads: row p holds cos(p * inv_freq), then sin(p * inv_freq)."""
    angles = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _launch_rotary_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None) -> None:
    """Run the kernel on checked arguments."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads = k.shape[1]
    half_pad = triton.next_power_of_2(head_dim // 2)
    tile = triton.next_power_of_2(max(num_q_heads, num_kv_heads)) * half_pad
    quantize = k_cache.dtype == FP8_KV_DTYPE
    _rotary_and_cache_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        k_scale if quantize else q, v_scale if quantize else q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), NUM_KV_HEADS=num_kv_heads,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF_DIM=head_dim // 2, HALF_PAD=half_pad,
        PAGE_SIZE=k_cache.shape[1], QUANTIZE=quantize, num_warps=max(1, min(8, tile // 256)),
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation in float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rotary_and_cache_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> None:
    """The same function in plain PyTorch: the CPU path, and the judge of the kernel in the tests. An fp8 cache is
    written with `quantize_fp8` from the float32 rotation, as the kernel quantises it."""
    cos, sin = cos_sin_cache[positions.long()][:, None, :].chunk(2, dim=-1)  # broadcast over heads
    q.copy_(_rotate(q, cos, sin))
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    page = k_cache.shape[1]
    new_k, new_v = _rotate(k[valid], cos[valid], sin[valid]), v[valid]
    if k_cache.dtype == FP8_KV_DTYPE:  # written as bytes: not every device has an fp8 indexing kernel
        new_k, new_v = quantize_fp8(new_k, k_scale).view(torch.uint8), quantize_fp8(new_v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    else:
        new_k = new_k.to(k_cache.dtype)
    k_cache[slots // page, slots % page] = new_k
    v_cache[slots // page, slots % page] = new_v


def _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    tensors = {"q": q, "k": k, "v": v, "positions": positions, "cos_sin_cache": cos_sin_cache, "k_cache": k_cache,
               "v_cache": v_cache, "slot_mapping": slot_mapping}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 3 or q.dtype not in DTYPES:
        raise ValueError(f"q must be float16/bfloat16/float32 [num_tokens, num_q_heads, head_size], "
                         f"got {tuple(q.shape)} {q.dtype}")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"q's head_size must be even to rotate in halves, got {head_dim}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[0] != num_tokens or t.shape[2] != head_dim or t.dtype != q.dtype:
            raise ValueError(f"{name} must be {q.dtype} [{num_tokens}, num_kv_heads, {head_dim}] like q, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_tokens,) or t.dtype not in INDEX_DTYPES:
            raise ValueError(f"{name} must be int32/int64 of shape ({num_tokens},), got {tuple(t.shape)} {t.dtype}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32 [max_positions, {head_dim}] (cos, then sin), "
                         f"got {tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}")
    check_paged_caches("k", k, k_cache, v_cache)
    if k_cache.dtype == FP8_KV_DTYPE:
        check_kv_scales(k_scale, v_scale, q.device)
    elif k_cache.dtype != k.dtype:
        raise ValueError(f"k_cache has dtype {k_cache.dtype} but k has {k.dtype}: the cache must be in k's dtype or "
                         "float8_e4m3fn")
    for name in ("q", "k", "v", "cos_sin_cache", "k_cache", "v_cache"):
        if tensors[name].stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Rotate q [num_tokens, num_q_heads, head_size] in place by `positions` (rotate-half RoPE, in fp32, table from
    `rotary_cos_sin_cache`; positions must be below its length), and write rotated k and v [num_tokens,
    num_kv_heads, head_size] into the paged caches [num_pages, page_size, num_kv_heads, head_size] at
    `slot_mapping` (-1 skips the token); k itself is left as it is. One pass over the step's q, k and v.
    An fp8 (e4m3) cache stores x / scale, saturated, with float32 per-tensor scales k_scale, v_scale (ignored for
    a cache in k's dtype). The kernel runs on CUDA; elsewhere plain PyTorch does the same.
    """
    _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    run = _launch_rotary_and_cache if q.device.type == "cuda" else _rotary_and_cache_torch
    run(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale)
