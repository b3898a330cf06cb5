"""`unified_attention`: vLLM's calling convention over Tritium's kernel, with every argument checked first."""

import torch

from tritium.ops.attention import kernel
from tritium.ops.attention.configs import AttentionConfig, choose_config
from tritium.ops.kv_cache import FP8_KV_DTYPE

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def window_size(sliding_window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right) for a sliding window of W keys, (W - 1, 0), or (-1, -1) for none."""
    return (-1, -1) if sliding_window is None else (sliding_window - 1, 0)


def unified_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    seqused_k: torch.Tensor,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_size: tuple[int, int],
    block_table: torch.Tensor,
    softcap: float,
    q_descale: torch.Tensor | None,
    k_descale: torch.Tensor | None,
    v_descale: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
    config: AttentionConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Paged attention over a batch mixing prefills, prefill chunks, decodes and speculative tokens.

    q, out: [num_tokens, num_q_heads, head_size]; k, v: [num_blocks, block_size, num_kv_heads, head_size]
    (fp8 e4m3 with per-tensor `k_descale`/`v_descale`, or q's dtype). Sequence i owns query tokens
    cu_seqlens_q[i]:cu_seqlens_q[i+1] and its first seqused_k[i] cached keys (new tokens included), found
    through block_table[i]; causal masks align bottom-right. window_size=(left, right) as in
    FlashAttention, (-1, -1) for none; softcap 0 for none; sinks are per-head logits joining the softmax.
    Tokens past cu_seqlens_q[-1] are padding and their rows of `out` are left as they are.
    Returns `out`, or (out, lse) with the natural-log log-sum-exp [num_q_heads, num_tokens] in float32.
    """
    _check(q, k, v, out, cu_seqlens_q, seqused_k, max_seqlen_k, softmax_scale, window_size, block_table,
           softcap, q_descale, k_descale, v_descale, alibi_slopes, sinks)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    num_seqs = cu_seqlens_q.numel() - 1
    if config is None:
        config = choose_config(q.device, num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim, k.shape[1])
    config.validate(num_q_heads // num_kv_heads)
    lse = torch.empty(num_q_heads, num_tokens, dtype=torch.float32, device=q.device) if return_lse else None
    if num_tokens > 0 and num_seqs > 0:
        kernel.launch(q, k, v, out, lse, cu_seqlens_q, seqused_k, block_table, alibi_slopes, sinks,
                      k_descale if k.dtype == FP8_KV_DTYPE else None, v_descale if v.dtype == FP8_KV_DTYPE else None,
                      float(softmax_scale), float(softcap), (int(window_size[0]), int(window_size[1])),
                      bool(causal), config)
    return (out, lse) if return_lse else out


def _check(q, k, v, out, cu_seqlens_q, seqused_k, max_seqlen_k, softmax_scale, window_size, block_table,
           softcap, q_descale, k_descale, v_descale, alibi_slopes, sinks) -> None:
    """Raise a ValueError naming the first argument that the kernel cannot take."""
    tensors = {"q": q, "k": k, "v": v, "out": out, "cu_seqlens_q": cu_seqlens_q, "seqused_k": seqused_k,
               "block_table": block_table}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_size], got shape {tuple(q.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must match q: shape {tuple(q.shape)} dtype {q.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads, head_size], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in (q.dtype, FP8_KV_DTYPE):
            raise ValueError(f"{name} has dtype {t.dtype}; it must be q's dtype ({q.dtype}) or float8_e4m3fn")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k and v must agree: {tuple(k.shape)} {k.dtype} vs {tuple(v.shape)} {v.dtype}")
    num_kv_heads, block_size = k.shape[2], k.shape[1]
    if k.shape[3] != head_dim:
        raise ValueError(f"k has head size {k.shape[3]} but q has {head_dim}")
    if not 16 <= head_dim <= MAX_HEAD_DIM or head_dim % 16:
        raise ValueError(f"head size {head_dim} is not supported: it must be a multiple of 16 from 16 to "
                         f"{MAX_HEAD_DIM} (64, 80, 96, 112, 128, 192, 256 ...)")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if num_q_heads // num_kv_heads > 128:
        raise ValueError(f"GQA ratio {num_q_heads // num_kv_heads} is above the supported 128")
    for name, t in (("q", q), ("out", out), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_size) dimension")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seqused_k", seqused_k), ("block_table", block_table)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 1:
        raise ValueError("cu_seqlens_q must be 1-D with num_seqs + 1 entries")
    num_seqs = cu_seqlens_q.numel() - 1
    if seqused_k.shape != (num_seqs,):
        raise ValueError(f"seqused_k must have shape ({num_seqs},) to match cu_seqlens_q, got {tuple(seqused_k.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] < num_seqs:
        raise ValueError(f"block_table must be [num_seqs >= {num_seqs}, max_blocks], got {tuple(block_table.shape)}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table must be contiguous in its last dimension")
    if block_table.shape[1] * block_size < max_seqlen_k:
        raise ValueError(f"block_table is too short: {block_table.shape[1]} blocks of {block_size} tokens cannot "
                         f"hold max_seqlen_k={max_seqlen_k} keys")
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 switches it off), got {softcap}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with each >= -1, got {window_size}")
    if q_descale is not None:
        raise ValueError("q_descale is not supported: queries are float16/bfloat16/float32, not fp8")
    if k.dtype == FP8_KV_DTYPE:
        for name, s in (("k_descale", k_descale), ("v_descale", v_descale)):
            if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype != torch.float32 or s.device != q.device:
                raise ValueError(f"{name} must be a float32 tensor with one element on {q.device} for an fp8 cache")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (num_q_heads,) or t.device != q.device:
            raise ValueError(f"{name} must be a tensor of shape ({num_q_heads},) on {q.device}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
