"""The unified paged-attention kernel: one launch for prefills, prefill chunks, decodes and speculative tokens.

Work layout. A program owns one query tile of one sequence for one KV head and (optionally) one slice of
the keys. The tile's BLOCK_M rows pack TOKENS_PER_TILE query tokens times the GROUP query heads that share
the KV head: row r is token `r // GROUP`, head `r % GROUP`. Every K/V tile that is loaded therefore serves
all heads of its group. Rows past TOKENS_PER_TILE * GROUP are padding and are never stored.

Grid: (tile slots, KV heads, key splits). The tile-slot count is a static bound (num_tokens //
TOKENS_PER_TILE + num_seqs), so the grid never depends on sequence lengths and the launch can be captured
in a CUDA graph; programs whose slot holds no tile exit at once. A program finds its sequence by binary
search over `cu_seqlens_q[i] // TOKENS_PER_TILE + i`, which bounds from above where sequence i's tiles start.

Within a sequence tiles run last-first, so under causal masking the heaviest tiles start first.
The keys a tile needs are cut into three runs of TILE_K-wide tiles: a masked run at the lower edge
(sliding window), an unmasked middle, and a masked run at the upper edge (causal diagonal, window's
right edge, end of context). Only the edge runs pay for masks.

K/V tiles come through pointer loads, or, where a tile lies within one page and the device has Hopper's
tensor-memory accelerator, through tensor descriptors over the cache viewed as [blocks * page, KV heads *
head size] (config.tma): the copy engine then fetches the tile straight into shared memory, with no address
arithmetic in the loop. A page of 16 keys cannot feed a 64-key tile that way: Hopper has no gather.

Scores are kept in log2 units: the softmax scale (times the fp8 scales of Q and K) and log2(e) are folded into
one multiplier, so the softmax uses exp2. Running max and sum stay in fp32.

fp8 (e4m3). K/V pages in fp8 are dequantized by per-tensor scales (K's folded into the score multiplier, V's into
the output). An fp8 query comes with its per-tensor scale; the dots then take DOT_DTYPE operands: fp8 themselves
where K/V are fp8 too and the device has fp8 tensor cores (P, in [0, 1], is scaled by P_FP8_SCALE into e4m3's
normal range first and the output scaled back), else the K/V dtype or a 16/32-bit type the query converts to
exactly. A bfloat16 query over fp8 K/V takes float16 dots (`unified.dot_dtype` says why), clamped to its range. An
fp8 output is the result divided by its scale, saturated to +-448 (vLLM's fused output quantisation).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tritium.ops.attention.configs import AttentionConfig, has_tma
from tritium.ops.kv_cache import FP8_MAX

LOG2E = tl.constexpr(1.4426950408889634)
# P in [0, 1] times 2^8 before it becomes an fp8 dot operand: e4m3's normal range starts at 2^-6 and its smallest
# number is 2^-9, so unscaled weights below ~2^-7 of the row's largest would lose bits or vanish; scaled, only those
# below 2^-17 do. A power of two: the output is scaled back exactly.
P_FP8_SCALE = tl.constexpr(256.0)


@triton.jit
def _tile_pages(block_table_row_ptr, tile_start, offs_t, context_len, PAGE_SIZE: tl.constexpr,
                TILE_IN_PAGE: tl.constexpr):
    """The cache pages of the key tile starting at tile_start: one page id (the tile fits in a page) or one per
    key. Keys past the context read page 0 (their loads are masked), so any tile start is safe to ask for.
    Ids stay int32 until the address is formed: a carried int64 vector of ids slowed the pipelined loop."""
    if TILE_IN_PAGE:
        key = tl.maximum(tl.minimum(tile_start, context_len - 1), 0)
        page = tl.load(block_table_row_ptr + key // PAGE_SIZE)
    else:
        offs_k = tile_start + offs_t
        page = tl.load(block_table_row_ptr + offs_k // PAGE_SIZE, mask=offs_k < context_len, other=0)
    return page


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q,
    k_cache_ptr, v_cache_ptr, block_table_row_ptr, k_desc, v_desc, kv_column,
    key_start, key_end, context_len,
    query_pos, alibi_slope,
    qk_scale, softcap, window_left, window_right,
    stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
    offs_d,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TILE_K: tl.constexpr, PAGE_SIZE: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr, PAGE_LOOKAHEAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
    MASKED: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Fold keys [key_start, key_end) (a whole number of TILE_K tiles) into the running softmax state."""
    offs_t = tl.arange(0, TILE_K)
    if PAGE_LOOKAHEAD:
        next_page = _tile_pages(block_table_row_ptr, key_start, offs_t, context_len, PAGE_SIZE, TILE_IN_PAGE)
    for tile_start in range(key_start, key_end, TILE_K):
        offs_k = tile_start + offs_t
        in_context = offs_k < context_len
        if PAGE_LOOKAHEAD:
            # The next tile's pages are read a step ahead: this step's K/V loads then depend on a value carried
            # over the loop, not on a load of the same step, and the compiler pipelines them one stage deeper.
            page = next_page
            next_page = _tile_pages(block_table_row_ptr, tile_start + TILE_K, offs_t, context_len, PAGE_SIZE,
                                    TILE_IN_PAGE)
        else:
            page = _tile_pages(block_table_row_ptr, tile_start, offs_t, context_len, PAGE_SIZE, TILE_IN_PAGE)
        if USE_TMA:  # the tile's rows of the [blocks * page, heads * dim] view: within one page, so contiguous
            row = page * PAGE_SIZE + tile_start % PAGE_SIZE
            k = k_desc.load([row, kv_column]).T
            v = v_desc.load([row, kv_column])
            if MASKED:  # rows past the context hold whatever the page held (NaN, say); 0 * NaN would poison P @ V
                v = tl.where(in_context[:, None], v, tl.zeros_like(v))
        else:
            if TILE_IN_PAGE:  # one page holds the whole tile: contiguous slots
                slot = tile_start % PAGE_SIZE + offs_t
            else:  # the tile spans pages
                slot = offs_k % PAGE_SIZE
            k_offs = page.to(tl.int64) * stride_k_block + slot * stride_k_slot
            v_offs = page.to(tl.int64) * stride_v_block + slot * stride_v_slot
            # K is loaded transposed, [HEAD_DIM_PAD, TILE_K], so that Q @ K needs no shuffle.
            k_ptrs = k_cache_ptr + k_offs[None, :] + offs_d[:, None]
            v_ptrs = v_cache_ptr + v_offs[:, None] + offs_d[None, :]
            if MASKED:
                if HEAD_DIM == HEAD_DIM_PAD:
                    k = tl.load(k_ptrs, mask=in_context[None, :], other=0.0)
                    v = tl.load(v_ptrs, mask=in_context[:, None], other=0.0)
                else:
                    d_ok = offs_d < HEAD_DIM
                    k = tl.load(k_ptrs, mask=in_context[None, :] & d_ok[:, None], other=0.0)
                    v = tl.load(v_ptrs, mask=in_context[:, None] & d_ok[None, :], other=0.0)
            elif HEAD_DIM == HEAD_DIM_PAD:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                d_ok = offs_d < HEAD_DIM
                k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)

        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
        if USE_SOFTCAP:
            # softcap * tanh(s / softcap), with tanh written through exp2 so that it runs everywhere.
            e = tl.exp2(s * (2.0 * LOG2E) / softcap)
            s = (softcap * LOG2E) * (1.0 - 2.0 / (e + 1.0))
        if USE_ALIBI:
            s += (alibi_slope * LOG2E)[:, None] * (offs_k[None, :] - query_pos[:, None]).to(tl.float32)
        if MASKED:
            visible = in_context[None, :] & (query_pos[:, None] >= 0)  # full [BLOCK_M, TILE_K] from the start
            if CAUSAL:
                visible = visible & (offs_k[None, :] <= query_pos[:, None])
            if USE_WINDOW:
                if window_left >= 0:
                    visible = visible & (offs_k[None, :] >= query_pos[:, None] - window_left)
                if window_right >= 0:
                    visible = visible & (offs_k[None, :] <= query_pos[:, None] + window_right)
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if q.dtype.is_fp8():  # fp8 dots (the epilogue divides P_FP8_SCALE out again)
            p = p * P_FP8_SCALE
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Lengths and counts vary from batch to batch: specialising on them (== 1, % 16) would only multiply compiles.
@triton.jit(do_not_specialize=["softcap", "window_left", "window_right", "num_seqs", "num_tokens", "num_splits"])
def unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_desc, v_desc, out_ptr, lse_ptr,
    partial_out_ptr, partial_lse_ptr,
    cu_seqlens_q_ptr, seqused_k_ptr, block_table_ptr,
    alibi_slopes_ptr, sinks_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr, out_scale_ptr,
    softmax_scale, softcap, window_left, window_right,
    num_seqs, num_q_heads, num_tokens, num_splits,
    stride_q_token, stride_q_head,
    stride_o_token, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_bt_seq, stride_lse_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, TILE_K: tl.constexpr, PAGE_SIZE: tl.constexpr,
    TILE_IN_PAGE: tl.constexpr, PAGE_LOOKAHEAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_KEYS: tl.constexpr,
    CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
    USE_SINKS: tl.constexpr, KV_SCALED: tl.constexpr, WRITE_LSE: tl.constexpr, USE_TMA: tl.constexpr,
    Q_SCALED: tl.constexpr, OUT_SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr, Q_CLAMP: tl.constexpr,
):
    tile_slot = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence owns this tile slot: the last i with cu_seqlens_q[i] // TOKENS_PER_TILE + i <= slot.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // TOKENS_PER_TILE + mid <= tile_slot:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    num_seq_tiles = (q_len + TOKENS_PER_TILE - 1) // TOKENS_PER_TILE
    local_slot = tile_slot - (q_start // TOKENS_PER_TILE + seq)
    if local_slot >= num_seq_tiles:
        return
    tile = num_seq_tiles - 1 - local_slot  # last tile first: under a causal mask it is the heaviest
    context_len = tl.load(seqused_k_ptr + seq)
    prefix_len = context_len - q_len  # bottom-right alignment: query token t sits at prefix_len + t

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_token = tile * TOKENS_PER_TILE + offs_m // GROUP
    row_head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < TOKENS_PER_TILE * GROUP) & (row_token < q_len)
    query_pos = prefix_len + row_token

    q_ptrs = (q_ptr + (q_start + row_token).to(tl.int64)[:, None] * stride_q_token
              + (row_head * stride_q_head)[:, None] + offs_d[None, :])
    if HEAD_DIM == HEAD_DIM_PAD:
        q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if Q_CLAMP:  # a bfloat16 query for float16 dots (over fp8 K/V): saturate instead of overflowing to inf
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0)
    q = q.to(DOT_DTYPE)  # exact but for Q_CLAMP's rounding to float16 (an fp8 query fits 16 bits)

    qk_scale = softmax_scale
    if Q_SCALED:
        qk_scale = qk_scale * tl.load(q_scale_ptr)
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if not USE_SOFTCAP:
        qk_scale = qk_scale * LOG2E
    alibi_slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        alibi_slope = tl.load(alibi_slopes_ptr + row_head, mask=row_valid, other=0.0).to(tl.float32)

    # A finite floor instead of -inf keeps exp2(m_old - m_new) defined for rows that see no key yet.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_SINKS:
        if split == 0:  # the sink is one more logit in the softmax: count it in exactly one split
            m_i = tl.load(sinks_ptr + row_head, mask=row_valid, other=-1.0e30).to(tl.float32) * LOG2E
            l_i = tl.where(row_valid, 1.0, 0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # Keys any row of the tile may see, and the keys every row sees (no mask needed there).
    first_pos = prefix_len + tile * TOKENS_PER_TILE
    last_pos = prefix_len + tl.minimum(tile * TOKENS_PER_TILE + TOKENS_PER_TILE, q_len) - 1
    key_hi = context_len
    full_hi = context_len
    key_lo = context_len * 0
    full_lo = context_len * 0
    if CAUSAL:
        key_hi = tl.minimum(key_hi, last_pos + 1)
        full_hi = tl.minimum(full_hi, first_pos + 1)
    if USE_WINDOW:
        if window_left >= 0:
            key_lo = tl.maximum(first_pos - window_left, 0)
            full_lo = tl.maximum(last_pos - window_left, 0)
        if window_right >= 0:
            key_hi = tl.minimum(key_hi, last_pos + window_right + 1)
            full_hi = tl.minimum(full_hi, first_pos + window_right + 1)
    key_lo = (key_lo // TILE_K) * TILE_K
    key_hi = tl.maximum(key_hi, key_lo)
    unmasked_lo = tl.maximum((full_lo + TILE_K - 1) // TILE_K * TILE_K, key_lo)
    unmasked_hi = (full_hi // TILE_K) * TILE_K
    if unmasked_hi <= unmasked_lo:
        unmasked_lo = key_lo
        unmasked_hi = key_lo
    if SPLIT_KEYS:
        key_tiles = (key_hi - key_lo + TILE_K - 1) // TILE_K
        tiles_per_split = (key_tiles + num_splits - 1) // num_splits
        split_lo = key_lo + split * tiles_per_split * TILE_K
        split_hi = tl.minimum(split_lo + tiles_per_split * TILE_K, key_hi)
        key_lo = tl.minimum(split_lo, key_hi)
        key_hi = tl.maximum(split_hi, key_lo)
        unmasked_lo = tl.minimum(tl.maximum(unmasked_lo, key_lo), key_hi)
        unmasked_hi = tl.maximum(tl.minimum(unmasked_hi, key_hi), unmasked_lo)

    block_table_row_ptr = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    k_head_ptr = k_cache_ptr + kv_head * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head * stride_v_head
    kv_column = kv_head * HEAD_DIM
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_head_ptr, v_head_ptr, block_table_row_ptr, k_desc, v_desc, kv_column,
        key_lo, unmasked_lo, context_len, query_pos, alibi_slope,
        qk_scale, softcap, window_left, window_right,
        stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, offs_d,
        HEAD_DIM, HEAD_DIM_PAD, TILE_K, PAGE_SIZE, TILE_IN_PAGE, PAGE_LOOKAHEAD, DOT_PRECISION,
        CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, True, USE_TMA)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_head_ptr, v_head_ptr, block_table_row_ptr, k_desc, v_desc, kv_column,
        unmasked_lo, unmasked_hi, context_len, query_pos, alibi_slope,
        qk_scale, softcap, window_left, window_right,
        stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, offs_d,
        HEAD_DIM, HEAD_DIM_PAD, TILE_K, PAGE_SIZE, TILE_IN_PAGE, PAGE_LOOKAHEAD, DOT_PRECISION,
        CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, False, USE_TMA)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_head_ptr, v_head_ptr, block_table_row_ptr, k_desc, v_desc, kv_column,
        unmasked_hi, key_hi, context_len, query_pos, alibi_slope,
        qk_scale, softcap, window_left, window_right,
        stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, offs_d,
        HEAD_DIM, HEAD_DIM_PAD, TILE_K, PAGE_SIZE, TILE_IN_PAGE, PAGE_LOOKAHEAD, DOT_PRECISION,
        CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_ALIBI, True, USE_TMA)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if KV_SCALED:
        out = out * tl.load(v_scale_ptr)
    if q.dtype.is_fp8():
        out = out * (1.0 / P_FP8_SCALE)
    lse2 = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    token = q_start + row_token
    if not SPLIT_KEYS:
        o_ptrs = (out_ptr + token.to(tl.int64)[:, None] * stride_o_token
                  + (row_head * stride_o_head)[:, None] + offs_d[None, :])
        if OUT_SCALED:  # an fp8 output: quantised by its scale, saturated
            out = tl.clamp(out / tl.load(out_scale_ptr), -FP8_MAX, FP8_MAX)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :])
        if WRITE_LSE:
            tl.store(lse_ptr + row_head * stride_lse_head + token, lse2 / LOG2E, mask=row_valid)
    else:
        # Partials: out [num_splits, num_tokens, num_q_heads, HEAD_DIM_PAD] fp32, lse (log2) likewise.
        row = (split * num_tokens + token).to(tl.int64) * num_q_heads + row_head
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], out, mask=row_valid[:, None])
        tl.store(partial_lse_ptr + row, lse2, mask=row_valid)


@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "num_splits"])
def merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr, cu_seqlens_q_ptr, out_scale_ptr,
    num_seqs, num_tokens, num_q_heads, num_splits,
    stride_o_token, stride_o_head, stride_lse_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, WRITE_LSE: tl.constexpr,
    OUT_SCALED: tl.constexpr,
):
    """Combine the key splits of one (token, head): a softmax-weighted sum of the partial outputs."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(cu_seqlens_q_ptr + num_seqs):
        return  # padding token past the batch: never written
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row = (offs_s * num_tokens + token).to(tl.int64) * num_q_heads + head
    lse2 = tl.load(partial_lse_ptr + row, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse2, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row no split saw (never for valid input) stays finite
    weight = tl.exp2(lse2 - m)
    total = tl.sum(weight, 0)
    parts = tl.load(partial_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :],
                    mask=(offs_s < num_splits)[:, None], other=0.0)
    out = tl.sum(parts * (weight / total)[:, None], 0)
    if OUT_SCALED:
        out = tl.clamp(out / tl.load(out_scale_ptr), -FP8_MAX, FP8_MAX)
    tl.store(out_ptr + token.to(tl.int64) * stride_o_token + head * stride_o_head + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        tl.store(lse_ptr + head * stride_lse_head + token, (m + tl.log2(total)) / LOG2E)


def tma_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tile_k: int) -> bool:
    """Whether tensor descriptors can fetch this launch's K/V tiles: the device has a tensor-memory accelerator
    (CUDA compute capability 9 or later; Triton's interpreter emulates one), a tile lies within one page, K/V
    are contiguous caches (fp8 or not) with a power-of-two head size (the descriptor's zero fill would
    otherwise read the next head) and row coordinates fit the descriptor's int32. The caches' addresses must be
    16-byte aligned too, which `launch` checks on each call."""
    if not (has_tma(q.device) or q.device.type == "cpu"):
        return False
    num_pages, page_size, num_kv_heads, head_dim = k_cache.shape
    return (page_size % tile_k == 0 and head_dim & (head_dim - 1) == 0
            and k_cache.is_contiguous() and v_cache.is_contiguous() and num_pages * page_size < 2**31)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything about a launch that the batch's shapes, dtypes, features and config fix: the grids and the
    compile-time arguments of both kernels. `unified.py` makes one per batch shape and reuses it."""

    config: AttentionConfig
    grid: tuple[int, int, int]
    constexprs: dict
    merge_constexprs: dict
    head_dim_pad: int
    use_tma: bool


def launch(
    plan: LaunchPlan, *, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor | None, cu_seqlens_q: torch.Tensor, seqused_k: torch.Tensor, block_table: torch.Tensor,
    alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None, q_scale: torch.Tensor | None,
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, out_scale: torch.Tensor | None,
    softmax_scale: float, softcap: float, window: tuple[int, int],
) -> None:
    """Launch on already validated arguments: the attention kernel, then the split merge when splitting."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    splits = plan.config.num_splits
    partial_out = partial_lse = q  # placeholders, never touched without splits
    if splits > 1:
        partial_out = torch.empty(splits, num_tokens, num_q_heads, plan.head_dim_pad, dtype=torch.float32,
                                  device=q.device)
        partial_lse = torch.empty(splits, num_tokens, num_q_heads, dtype=torch.float32, device=q.device)
    unused = q  # pointer for switched-off features
    k_desc = v_desc = None
    if plan.use_tma and k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0:
        page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        view_shape, view_strides = [k_cache.shape[0] * page_size, num_kv_heads * head_dim], [num_kv_heads * head_dim, 1]
        k_desc = TensorDescriptor(k_cache, view_shape, view_strides, [plan.config.tile_k, head_dim])
        v_desc = TensorDescriptor(v_cache, view_shape, view_strides, [plan.config.tile_k, head_dim])
    unified_attention_kernel[plan.grid](
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, k_desc=k_desc, v_desc=v_desc, out_ptr=out,
        lse_ptr=unused if lse is None else lse, partial_out_ptr=partial_out, partial_lse_ptr=partial_lse,
        cu_seqlens_q_ptr=cu_seqlens_q, seqused_k_ptr=seqused_k, block_table_ptr=block_table,
        alibi_slopes_ptr=unused if alibi_slopes is None else alibi_slopes, sinks_ptr=unused if sinks is None else sinks,
        q_scale_ptr=unused if q_scale is None else q_scale, k_scale_ptr=unused if k_scale is None else k_scale,
        v_scale_ptr=unused if v_scale is None else v_scale, out_scale_ptr=unused if out_scale is None else out_scale,
        softmax_scale=softmax_scale, softcap=softcap, window_left=window[0], window_right=window[1],
        num_seqs=num_seqs, num_q_heads=num_q_heads, num_tokens=num_tokens, num_splits=splits,
        stride_q_token=q.stride(0), stride_q_head=q.stride(1), stride_o_token=out.stride(0),
        stride_o_head=out.stride(1), stride_k_block=k_cache.stride(0), stride_k_slot=k_cache.stride(1),
        stride_k_head=k_cache.stride(2), stride_v_block=v_cache.stride(0), stride_v_slot=v_cache.stride(1),
        stride_v_head=v_cache.stride(2), stride_bt_seq=block_table.stride(0),
        stride_lse_head=0 if lse is None else lse.stride(0),
        USE_TMA=k_desc is not None, **plan.constexprs,
    )
    if splits > 1:
        merge_splits_kernel[(num_tokens, num_q_heads)](
            partial_out_ptr=partial_out, partial_lse_ptr=partial_lse, out_ptr=out,
            lse_ptr=unused if lse is None else lse, cu_seqlens_q_ptr=cu_seqlens_q,
            out_scale_ptr=unused if out_scale is None else out_scale, num_seqs=num_seqs, num_tokens=num_tokens,
            num_q_heads=num_q_heads, num_splits=splits,
            stride_o_token=out.stride(0), stride_o_head=out.stride(1),
            stride_lse_head=0 if lse is None else lse.stride(0), **plan.merge_constexprs,
        )
