"""`write_kv_cache`: scatter new tokens' keys and values into the paged cache, quantising for an fp8 cache."""

import torch
import triton
import triton.language as tl

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = tl.constexpr(448.0)  # largest finite float8 e4m3fn


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an fp8 cache stores for x: x / scale in float32, saturated to +-448, rounded to float8 e4m3 by torch.
    The definition the kernels' quantisation is judged by, and the CPU path (Triton's interpreter rounds fp32 to
    fp8 wrongly)."""
    return (x.float() / scale).clamp(-FP8_MAX.value, FP8_MAX.value).to(FP8_KV_DTYPE)


def check_kv_scales(k_scale: object, v_scale: object, device: torch.device) -> None:
    """An fp8 cache's scales: float32 tensors of one element on the data's device; a ValueError names the bad one."""
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
            raise ValueError(f"{name} must be a float32 tensor with one element on {device} for an fp8 cache")


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, QUANTIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return  # padding token
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = token.to(tl.int64) * stride_key_token + offs_h[:, None] * stride_key_head + offs_d[None, :]
    key = tl.load(key_ptr + src, mask=mask)
    src = token.to(tl.int64) * stride_value_token + offs_h[:, None] * stride_value_head + offs_d[None, :]
    value = tl.load(value_ptr + src, mask=mask)
    if QUANTIZE:
        # div_rn: correctly rounded, so values near an fp8 rounding tie land where torch puts them
        key = tl.clamp(tl.math.div_rn(key.to(tl.float32), tl.load(k_scale_ptr)), -FP8_MAX, FP8_MAX)
        value = tl.clamp(tl.math.div_rn(value.to(tl.float32), tl.load(v_scale_ptr)), -FP8_MAX, FP8_MAX)
    dst = block * stride_k_block + offset * stride_k_slot + offs_h[:, None] * stride_k_head + offs_d[None, :]
    tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    dst = block * stride_v_block + offset * stride_v_slot + offs_h[:, None] * stride_v_head + offs_d[None, :]
    tl.store(v_cache_ptr + dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_paged_caches(name: str, key: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """The caches are one vLLM-layout pair [num_pages, page_size, num_kv_heads, head_size] that holds `key`'s
    (heads, head_size); a ValueError says which part disagrees."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must be matching [num_pages, page_size, num_kv_heads, head_size], "
                         f"got {tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"{name} has (heads, head_size) {tuple(key.shape[1:])} but the cache holds "
                         f"{tuple(k_cache.shape[2:])}")


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_size] to slots of k_cache/v_cache
    [num_pages, page_size, num_kv_heads, head_size]; slot = page * page_size + offset, -1 skips the
    token. An fp8 (e4m3) cache stores x / scale, saturated, with per-tensor float32 scales k_scale, v_scale.
    """
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != key.device:
            raise ValueError(f"{name} is on {t.device} but key is on {key.device}")
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key and value must both be [num_tokens, num_kv_heads, head_size], "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    check_paged_caches("key", key, k_cache, v_cache)
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 of shape ({key.shape[0]},), "
                         f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    quantize = k_cache.dtype == FP8_KV_DTYPE
    if quantize:
        check_kv_scales(k_scale, v_scale, key.device)
    elif k_cache.dtype != key.dtype:
        raise ValueError(f"k_cache has dtype {k_cache.dtype} but key has {key.dtype} (only an fp8 cache converts)")
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_size) dimension")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        k_scale if quantize else key, v_scale if quantize else key,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), PAGE_SIZE=k_cache.shape[1], QUANTIZE=quantize,
    )
