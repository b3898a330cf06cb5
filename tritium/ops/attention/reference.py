"""The judge: the same function as `unified_attention`, in plain PyTorch, written for clarity not speed."""

import torch


def attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seqused_k: torch.Tensor,
    block_table: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged attention computed sequence by sequence in `dtype`, on the device the inputs are on.

    q_scale dequantizes an fp8 query, k_scale/v_scale an fp8 cache (each ignored where the tensor is not fp8, as
    `unified_attention` ignores them).
    Returns (out [num_tokens, num_q_heads, head_size], lse [num_q_heads, num_tokens]); rows of padding
    tokens past cu_seqlens_q[-1] are zero in `out` and -inf in `lse`.
    """
    device = q.device
    q_mult = float(q_scale) if q.dtype == torch.float8_e4m3fn and q_scale is not None else 1.0
    q = q.detach().to(dtype) * q_mult
    quantized = k_cache.dtype == torch.float8_e4m3fn  # scales dequantize an fp8 cache; other caches ignore them
    k_mult = float(k_scale) if quantized and k_scale is not None else 1.0
    v_mult = float(v_scale) if quantized and v_scale is not None else 1.0
    cu = cu_seqlens_q.tolist()
    used = seqused_k.tolist()
    table = block_table.to(device)
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    left, right = window_size
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=dtype, device=device)
    lse = torch.full((num_q_heads, num_tokens), float("-inf"), dtype=dtype, device=device)

    for seq in range(len(cu) - 1):
        start, end, context = cu[seq], cu[seq + 1], used[seq]
        if end == start:
            continue
        pages = table[seq, : -(-context // block_size)].long()
        keys = _gather(k_cache, pages).reshape(-1, num_kv_heads, head_dim)[:context].to(dtype) * k_mult
        values = _gather(v_cache, pages).reshape(-1, num_kv_heads, head_dim)[:context].to(dtype) * v_mult
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)

        scores = torch.einsum("qhd,khd->hqk", q[start:end], keys) * softmax_scale  # [heads, queries, keys]
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = torch.arange(context - (end - start), context, device=device)[:, None]  # bottom-right aligned
        key_pos = torch.arange(context, device=device)[None, :]
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.to(device, dtype)[:, None, None] * (key_pos - query_pos)
        visible = torch.ones(end - start, context, dtype=torch.bool, device=device)
        if causal:
            visible &= key_pos <= query_pos
        if left >= 0:
            visible &= key_pos >= query_pos - left
        if right >= 0:
            visible &= key_pos <= query_pos + right
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:  # one extra logit per head that takes probability mass but carries no value
            sink = sinks.to(device, dtype)[:, None, None].expand(-1, end - start, 1)
            scores = torch.cat([scores, sink], dim=-1)
            values = torch.cat([values, torch.zeros_like(values[:1])], dim=0)
        seq_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - seq_lse[..., None])
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values)
        lse[:, start:end] = seq_lse
    return out, lse


def _gather(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """cache[pages]; an fp8 cache is indexed through its bytes (not every device has an fp8 indexing kernel)."""
    if cache.element_size() == 1 and cache.dtype.is_floating_point:
        return cache.view(torch.uint8)[pages].view(cache.dtype)
    return cache[pages]
