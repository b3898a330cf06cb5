"""Random paged-attention batches in vLLM's layout, shared by the kernel benchmark and the tests."""

from dataclasses import dataclass

import torch

from tritium.ops.attention.reference import attention_reference
from tritium.ops.kv_cache import FP8_KV_DTYPE


@dataclass
class PagedBatch:
    """One attention call's inputs. Pages are shuffled through the pool; unused cache slots hold NaN,
    so a kernel that reads past a sequence's context poisons its own output."""

    q: torch.Tensor  # [num_tokens, num_q_heads, head_size]
    k_cache: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_size]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]
    seqused_k: torch.Tensor  # int32 [num_seqs]
    block_table: torch.Tensor  # int32 [num_seqs, max_pages]
    max_seqlen_q: int
    max_seqlen_k: int
    k_scale: torch.Tensor | None = None  # per-tensor float32 scales of an fp8 cache
    v_scale: torch.Tensor | None = None
    q_scale: torch.Tensor | None = None  # per-tensor float32 scale of an fp8 query

    @property
    def num_valid_tokens(self) -> int:
        return int(self.cu_seqlens_q[-1])

    def kernel_args(self, out: torch.Tensor, causal: bool = True, window_size: tuple[int, int] = (-1, -1),
                    softcap: float = 0.0, softmax_scale: float | None = None) -> tuple:
        """Positional arguments of `unified_attention`, vLLM's order."""
        scale = softmax_scale if softmax_scale is not None else self.q.shape[-1] ** -0.5
        return (self.q, self.k_cache, self.v_cache, out, self.cu_seqlens_q, self.max_seqlen_q, self.seqused_k,
                self.max_seqlen_k, scale, causal, window_size, self.block_table, softcap, self.q_scale,
                self.k_scale, self.v_scale)


def random_paged_batch(
    seqs: list[tuple[int, int]],
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    page_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    kv_dtype: torch.dtype | None = None,
    pad_tokens: int = 0,
    spare_pages: int = 2,
    generator: torch.Generator | None = None,
) -> PagedBatch:
    """A batch of sequences given as (query_len, context_len) pairs, context counting the new tokens.

    pad_tokens adds query rows past the last sequence (as a CUDA-graph batch is padded). kv_dtype
    float8_e4m3fn stores the cache in fp8 with per-tensor scales chosen from the data (the default for an fp8 query,
    else q's dtype); dtype float8_e4m3fn makes the query fp8 in the same way.
    """
    kv_dtype = kv_dtype or dtype
    for q_len, ctx in seqs:
        if not 0 <= q_len <= ctx:
            raise ValueError(f"each sequence needs 0 <= query_len <= context_len, got ({q_len}, {ctx})")
    device = torch.device(device)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    num_tokens = sum(q for q, _ in seqs) + pad_tokens
    pages_per_seq = [-(-ctx // page_size) for _, ctx in seqs]
    num_pages = sum(pages_per_seq) + spare_pages
    max_pages = max(pages_per_seq + [1])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    q = randn(num_tokens, num_q_heads, head_size)
    k_cache = torch.full((num_pages, page_size, num_kv_heads, head_size), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    order = torch.randperm(num_pages, generator=g)
    block_table = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
    taken = 0
    for i, (_, ctx) in enumerate(seqs):
        pages = order[taken : taken + pages_per_seq[i]]
        taken += pages_per_seq[i]
        block_table[i, : len(pages)] = pages.to(torch.int32)
        for j, page in enumerate(pages.tolist()):
            used = min(page_size, ctx - j * page_size)
            k_cache[page, :used] = randn(used, num_kv_heads, head_size)
            v_cache[page, :used] = randn(used, num_kv_heads, head_size)

    q, q_scale = _quantized(q, dtype, device)
    k_cache, k_scale = _quantized(k_cache, kv_dtype, device)
    v_cache, v_scale = _quantized(v_cache, kv_dtype, device)

    cu = [0]
    for q_len, _ in seqs:
        cu.append(cu[-1] + q_len)
    return PagedBatch(
        q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seqused_k=torch.tensor([ctx for _, ctx in seqs], dtype=torch.int32, device=device),
        block_table=block_table.to(device),
        max_seqlen_q=max([q for q, _ in seqs] + [0]), max_seqlen_k=max([c for _, c in seqs] + [0]),
        k_scale=k_scale, v_scale=v_scale, q_scale=q_scale,
    )


def _quantized(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x in `dtype`; for fp8, x / scale with the scale (on `device`) that maps its largest magnitude to 224."""
    if dtype != FP8_KV_DTYPE:
        return x.to(dtype), None
    scale = torch.tensor([x.nan_to_num().abs().max().item() / 224.0], dtype=torch.float32)
    return (x / scale).to(dtype), scale.to(device)


def reference_sample(
    batch: PagedBatch, window_size: tuple[int, int] = (-1, -1), rows_per_seq: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices, and reference rows (float64) for them: the last `rows_per_seq` queries of the first,
    middle and last sequences.

    The last rows of a sequence are themselves a valid chunk (bottom-right alignment), so the reference
    runs on a small batch of those chunks instead of the whole scenario.
    """
    n = batch.seqused_k.numel()
    picked = sorted({0, n // 2, n - 1})
    cu = batch.cu_seqlens_q.tolist()
    rows, cu_sub = [], [0]
    for i in picked:
        take = min(rows_per_seq, cu[i + 1] - cu[i])
        rows.extend(range(cu[i + 1] - take, cu[i + 1]))
        cu_sub.append(cu_sub[-1] + take)
    rows_t = torch.tensor(rows, device=batch.q.device)
    idx = torch.tensor(picked, device=batch.q.device)
    q = batch.q.view(torch.uint8)[rows_t].view(batch.q.dtype) if batch.q_scale is not None else batch.q[rows_t]
    ref, _ = attention_reference(
        q, batch.k_cache, batch.v_cache, torch.tensor(cu_sub, dtype=torch.int32),
        batch.seqused_k[idx], batch.block_table[idx], batch.q.shape[-1] ** -0.5, window_size=window_size,
        q_scale=batch.q_scale, k_scale=batch.k_scale, v_scale=batch.v_scale,
        dtype=torch.float32 if batch.q.is_cuda else torch.float64)
    return rows_t, ref.double()
