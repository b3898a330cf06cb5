"""Shared helpers of the attention tests: run `unified_attention` on a PagedBatch and judge it against
`attention_reference`, the float64 (or float32) PyTorch judge."""

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tritium.ops import AttentionConfig, attention_reference, unified_attention
from tritium.ops.attention.batches import PagedBatch
from tritium.ops.attention.unified import dot_dtype

NAN = float("nan")
FP8 = torch.float8_e4m3fn

# Bounds on ||out - ref|| / ||ref|| over the valid rows, by the dtype the dots run in (q's, or for an fp8 query
# `dot_dtype`'s). The interpreter computes in fp32, so float32 is tight; float16/bfloat16 lose precision where P is
# cast for the P @ V product; fp8 dots (a GPU's) round P to e4m3's 3 mantissa bits (up to 2^-4 of each weight, the
# errors of many keys averaging out).
OUT_BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, FP8: 5e-2}
# Bounds on |lse - ref_lse| / max(1, |ref_lse|): scores are fp32 sums of exact products in every dtype (fp8 products
# too: e4m3 times e4m3 is exact in fp32; Hopper's fp8 accumulation keeps fewer bits).
LSE_BOUND = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3, FP8: 2e-3}


def judged_dtype(batch: PagedBatch, config: AttentionConfig | None = None) -> torch.dtype:
    """The dtype whose bounds judge a call on this batch: the one its dots run in (with the largest tile when no
    config is given: fp8 dots on a GPU that has them, the looser bound), or a 16-bit query's own where it is looser
    (the output is rounded to it: a bfloat16 query over fp8 pages runs float16 dots)."""
    dots = dot_dtype(batch.q, batch.k_cache, config or AttentionConfig(128, 64))
    if batch.q.dtype in (torch.float16, torch.bfloat16) and OUT_BOUND[batch.q.dtype] > OUT_BOUND[dots]:
        return batch.q.dtype
    return dots


@dataclass(frozen=True)
class Features:
    """The optional parts of one attention call; alibi/sinks say whether to draw random ones."""

    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    sinks: bool = False
    scale: float | None = None  # softmax scale; None for head_size ** -0.5


PLAIN = Features()


@dataclass
class Extras:
    """The per-head tensors of a call (on the batch's device), drawn once and shared by kernel and reference."""

    alibi_slopes: torch.Tensor | None = None
    sinks: torch.Tensor | None = None


def draw_extras(batch: PagedBatch, features: Features, gen: torch.Generator) -> Extras:
    num_q_heads = batch.q.shape[1]
    extras = Extras()
    if features.alibi:
        # ALiBi's geometric slopes, jittered so that no two heads share one.
        base = 2.0 ** (-8.0 * torch.arange(1, num_q_heads + 1, dtype=torch.float32) / num_q_heads)
        extras.alibi_slopes = (base * (0.5 + torch.rand(num_q_heads, generator=gen))).to(batch.q.device)
    if features.sinks:
        extras.sinks = (2.0 * torch.randn(num_q_heads, generator=gen) + 1.0).to(batch.q.device)
    return extras


def softmax_scale(batch: PagedBatch, features: Features) -> float:
    return features.scale if features.scale is not None else batch.q.shape[-1] ** -0.5


def poisoned_like(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output for q, all NaN (fp8's NaN too), in `dtype` (default q's; for an fp8 q, float32)."""
    dtype = dtype or (torch.float32 if q.dtype == FP8 else q.dtype)
    return torch.full(q.shape, NAN, device=q.device).to(dtype)


def attend(batch: PagedBatch, features: Features = PLAIN, extras: Extras | None = None,
           config: AttentionConfig | None = None, out: torch.Tensor | None = None,
           output_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel into an output poisoned with NaN (or into `out`, as it is); returns (out, lse)."""
    extras = extras or Extras()
    if out is None:
        out = poisoned_like(batch.q)
    args = batch.kernel_args(out, causal=features.causal, window_size=features.window, softcap=features.softcap,
                             softmax_scale=softmax_scale(batch, features))
    result, lse = unified_attention(*args, extras.alibi_slopes, extras.sinks, output_scale=output_scale,
                                    return_lse=True, config=config)
    assert result is out, "unified_attention must return the `out` it was given"
    assert lse.shape == (batch.q.shape[1], batch.q.shape[0]) and lse.dtype == torch.float32
    return out, lse


def reference(batch: PagedBatch, features: Features = PLAIN, extras: Extras | None = None,
              dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's (out, lse) on the CPU; an fp8 cache is dequantized with the batch's scales."""
    extras = extras or Extras()
    return attention_reference(
        batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seqused_k, batch.block_table,
        softmax_scale(batch, features), causal=features.causal, window_size=features.window,
        softcap=features.softcap, alibi_slopes=extras.alibi_slopes, sinks=extras.sinks,
        q_scale=batch.q_scale, k_scale=batch.k_scale, v_scale=batch.v_scale, dtype=dtype)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


def triton_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x converted by Triton's own `.to(dtype)` on this backend: in the interpreter, its (wrong) fp32 -> fp8
    rounding, which kernels that quantise are judged against on the CPU."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaN compares equal to NaN."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


def check_untouched_and_finite(batch: PagedBatch, out: torch.Tensor, lse: torch.Tensor | None = None,
                               what: str = "") -> None:
    """Rows of padding tokens past cu_seqlens_q[-1] still NaN; valid rows (and their lse) finite."""
    n = batch.num_valid_tokens
    assert torch.isnan(out[n:]).all(), f"{what}: rows of padding tokens past cu_seqlens_q[-1] were written"
    finite = torch.isfinite(out[:n]).flatten(1).all(1)
    assert finite.all(), f"{what}: non-finite values in valid rows (tokens " \
        f"{torch.nonzero(~finite).flatten()[:20].tolist()})"
    if lse is not None:
        assert torch.isfinite(lse[:, :n]).all(), f"{what}: non-finite lse in valid rows"


def check_close(out: torch.Tensor, ref: torch.Tensor, lse: torch.Tensor | None, ref_lse: torch.Tensor | None,
                dtype: torch.dtype, bound: float | None = None, lse_bound: float | None = None,
                what: str = "") -> float:
    """||out - ref|| / ||ref|| below the dtype's bound, lse within its bound; returns the relative error."""
    if out.numel() == 0:
        return 0.0
    bound = OUT_BOUND[dtype] if bound is None else bound
    err = rel_err(out, ref)
    assert err < bound, f"{what}: relative error {err:.3e} >= {bound:.1e}"
    if lse is not None:
        lse_bound = LSE_BOUND[dtype] if lse_bound is None else lse_bound
        got, want = lse.detach().cpu().double(), ref_lse.detach().cpu().double()
        lse_err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
        assert lse_err < lse_bound, f"{what}: lse error {lse_err:.3e} >= {lse_bound:.1e}"
    return err


def check(batch: PagedBatch, out: torch.Tensor, ref: torch.Tensor, lse: torch.Tensor | None = None,
          ref_lse: torch.Tensor | None = None, bound: float | None = None, lse_bound: float | None = None,
          what: str = "") -> float:
    """Judge one call: valid rows finite and within `bound` of the reference, padding rows untouched (NaN),
    lse of the valid rows within `lse_bound`. Returns the relative error."""
    n = batch.num_valid_tokens
    check_untouched_and_finite(batch, out, lse, what)
    return check_close(out[:n], ref[:n], None if lse is None else lse[:, :n],
                       None if ref_lse is None else ref_lse[:, :n], judged_dtype(batch), bound, lse_bound, what)


def attend_and_check(batch: PagedBatch, features: Features = PLAIN, gen: torch.Generator | None = None,
                     config: AttentionConfig | None = None, bound: float | None = None,
                     extras: Extras | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the features' tensors, run the kernel and the reference, check; returns the kernel's (out, lse)."""
    if extras is None:
        extras = draw_extras(batch, features, gen if gen is not None else torch.Generator().manual_seed(0))
    out, lse = attend(batch, features, extras, config)
    ref, ref_lse = reference(batch, features, extras)
    check(batch, out, ref, lse, ref_lse, bound=bound, what=f"{features} {config}")
    return out, lse


def nan_page(batch: PagedBatch) -> int:
    """A page of the pool that no sequence uses (random_paged_batch keeps spare pages, all NaN)."""
    used = set()
    page_size = batch.k_cache.shape[1]
    for i, ctx in enumerate(batch.seqused_k.tolist()):
        used.update(batch.block_table[i, : -(-ctx // page_size)].tolist())
    spare = sorted(set(range(batch.k_cache.shape[0])) - used)
    assert spare, "the pool has no spare page"
    return spare[0]


def poison_unused_table_entries(batch: PagedBatch) -> PagedBatch:
    """Point every block-table entry past a sequence's last page at a NaN page, as stale entries of a
    reused table would point at other sequences' pages: a kernel that reads one poisons its output."""
    page = nan_page(batch)
    page_size = batch.k_cache.shape[1]
    for i, ctx in enumerate(batch.seqused_k.tolist()):
        batch.block_table[i, -(-ctx // page_size):] = page
    return batch


# --- Batches whose sequence lengths change under fixed tensor shapes (the CPU analogue of graph replay) ---


def static_like(batch: PagedBatch, num_pages: int, max_pages: int) -> PagedBatch:
    """Buffers with batch's num_tokens and num_seqs, a pool of num_pages pages and a block table of
    max_pages columns, loaded with `batch`; later batches of the same num_tokens/num_seqs go in with
    `load_into`, as a CUDA-graph runner copies new inputs into its captured tensors."""
    k = batch.k_cache
    static = PagedBatch(
        q=torch.empty_like(batch.q),
        k_cache=torch.empty((num_pages, *k.shape[1:]), dtype=k.dtype, device=k.device),
        v_cache=torch.empty((num_pages, *k.shape[1:]), dtype=k.dtype, device=k.device),
        cu_seqlens_q=torch.empty_like(batch.cu_seqlens_q),
        seqused_k=torch.empty_like(batch.seqused_k),
        block_table=torch.empty((batch.block_table.shape[0], max_pages), dtype=torch.int32, device=k.device),
        max_seqlen_q=batch.q.shape[0], max_seqlen_k=max_pages * k.shape[1],
        k_scale=None if batch.k_scale is None else torch.empty_like(batch.k_scale),
        v_scale=None if batch.v_scale is None else torch.empty_like(batch.v_scale),
        q_scale=None if batch.q_scale is None else torch.empty_like(batch.q_scale),
    )
    load_into(static, batch)
    return static


def load_into(static: PagedBatch, batch: PagedBatch) -> PagedBatch:
    """Copy batch's values into static's tensors in place; returns `batch` with static's pool and table
    (what the reference must see), so that a check judges what the kernel was given."""
    assert static.q.shape == batch.q.shape and static.cu_seqlens_q.shape == batch.cu_seqlens_q.shape
    num_pages, max_pages = batch.k_cache.shape[0], batch.block_table.shape[1]
    assert num_pages <= static.k_cache.shape[0] and max_pages <= static.block_table.shape[1]
    static.q.copy_(batch.q)
    for dst, src in ((static.k_cache, batch.k_cache), (static.v_cache, batch.v_cache)):
        dst[:num_pages].copy_(src)
        # Pages past the new pool keep garbage: NaN, so that a read of them shows.
        dst[num_pages:].copy_(torch.full(dst[num_pages:].shape, NAN).to(dst.dtype))
    static.cu_seqlens_q.copy_(batch.cu_seqlens_q)
    static.seqused_k.copy_(batch.seqused_k)
    static.block_table.fill_(static.k_cache.shape[0] - 1)  # stale entries point at a NaN page
    static.block_table[:, :max_pages].copy_(batch.block_table)
    for name in ("k_scale", "v_scale", "q_scale"):
        if getattr(batch, name) is not None:
            getattr(static, name).copy_(getattr(batch, name))
    return dataclasses.replace(batch, k_cache=static.k_cache, v_cache=static.v_cache,
                               block_table=static.block_table)


# --- Sampling sequences and query rows of a large batch, for a cheap reference (GPU tests) ---


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] on the CPU."""
    if t.dtype == torch.float8_e4m3fn:  # index through the bytes: no fp8 indexing kernel needed
        return t.view(torch.uint8)[index].view(t.dtype).cpu()
    return t[index].cpu()


def sub_batch(batch: PagedBatch, picks: list, causal: bool = True) -> tuple[PagedBatch, torch.Tensor]:
    """Some query rows of batch as a batch of their own on the CPU, with a compact pool holding only their
    pages; also the indices of those rows in the original batch (to slice `out` and `lse`).

    A pick is a sequence index (all its rows) or (seq, lo, hi): its query rows lo:hi. Rows lo:hi of a
    sequence with prefix P sit at positions P+lo .. P+hi-1; they become a sequence of its own with context
    P+hi, the same positions under bottom-right alignment. Cutting the context is exact only under a causal
    mask, so without one a pick must end at the sequence's last row.
    """
    cu = batch.cu_seqlens_q.tolist()
    used = batch.seqused_k.tolist()
    page_size = batch.k_cache.shape[1]
    rows, pages, new_cu, contexts = [], [], [0], []
    for pick in picks:
        seq, lo, hi = (pick, 0, None) if isinstance(pick, int) else pick
        q_len = cu[seq + 1] - cu[seq]
        hi = q_len if hi is None else hi
        assert 0 <= lo <= hi <= q_len and (causal or hi == q_len), pick
        context = used[seq] - q_len + hi
        rows.append(torch.arange(cu[seq] + lo, cu[seq] + hi))
        new_cu.append(new_cu[-1] + hi - lo)
        contexts.append(context)
        pages.append(batch.block_table[seq, : math.ceil(context / page_size)].long().cpu())
    block_table = torch.zeros(len(picks), max([len(p) for p in pages] + [1]), dtype=torch.int32)
    offset = 0
    for j, seq_pages in enumerate(pages):
        block_table[j, : len(seq_pages)] = torch.arange(offset, offset + len(seq_pages), dtype=torch.int32)
        offset += len(seq_pages)
    flat = torch.cat(pages).to(batch.k_cache.device)
    rows = torch.cat(rows)
    sub = PagedBatch(
        q=_take(batch.q, rows.to(batch.q.device)),
        k_cache=_take(batch.k_cache, flat), v_cache=_take(batch.v_cache, flat),
        cu_seqlens_q=torch.tensor(new_cu, dtype=torch.int32),
        seqused_k=torch.tensor(contexts, dtype=torch.int32),
        block_table=block_table,
        max_seqlen_q=max(new_cu[j + 1] - new_cu[j] for j in range(len(picks))),
        max_seqlen_k=max(contexts),
        k_scale=None if batch.k_scale is None else batch.k_scale.cpu(),
        v_scale=None if batch.v_scale is None else batch.v_scale.cpu(),
        q_scale=None if batch.q_scale is None else batch.q_scale.cpu(),
    )
    return sub, rows


def check_sampled(batch: PagedBatch, out: torch.Tensor, lse: torch.Tensor, picks: list,
                  features: Features = PLAIN, extras: Extras | None = None, bound: float | None = None,
                  ref_dtype: torch.dtype = torch.float64, what: str = "") -> float:
    """`check` for a large batch: padding and finiteness over every row, values of the picked rows against
    the reference computed on those rows alone."""
    check_untouched_and_finite(batch, out, lse, what)
    sub, rows = sub_batch(batch, picks, causal=features.causal)
    ref, ref_lse = reference(sub, features, extras, dtype=ref_dtype)
    rows = rows.to(out.device)
    return check_close(out[rows], ref, lse[:, rows], ref_lse, judged_dtype(batch), bound, what=what)
