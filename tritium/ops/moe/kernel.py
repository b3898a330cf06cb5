"""The fused mixture-of-experts kernels and their launcher.

One MoE layer is five launches over static grids (a function of the token count, the experts and the config,
never of the routing), so a step can be captured in a CUDA graph:
1. `count_kernel`: each assignment (token, k) gets its rank among the assignments of its expert; the experts'
   counts are summed on the device (one atomic add per expert and chunk of assignments).
2. `scatter_kernel`: assignments are written in expert order (`sorted_ids`), expert e's at offset
   sum(counts[:e]). Together: a counting sort on the device.
3. `gate_up_kernel`: a grouped GEMM. A program takes BLOCK_M rows of one expert (which expert, and where its rows
   start, follow from the counts) and BLOCK_N columns of both gate and up; its epilogue applies silu(gate) * up.
   Rows are written in expert order.
4. `down_kernel`: the grouped GEMM of the down projection over those rows, each result row written at its
   assignment's place.
5. `combine_kernel`: each token's routing-weighted sum of its experts' rows.
Programs past the last tile of the last expert exit at once.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tritium.ops.moe.configs import GemmConfig, MoEConfig

# Assignments per program of the counting sort, times the padded expert count: the size of its one-hot tile.
_SORT_TILE = 8192


@triton.jit(do_not_specialize=["num_assignments"])
def count_kernel(topk_ids_ptr, counts_ptr, ranks_ptr, num_assignments,
                 NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    valid = offs < num_assignments
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=-1)
    experts = tl.arange(0, EXPERTS_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)  # an id outside [0, NUM_EXPERTS) matches no column
    in_chunk = tl.sum(onehot, axis=0)
    # The chunk reserves a run of ranks per expert; within it, assignments keep their order.
    base = tl.atomic_add(counts_ptr + experts, in_chunk, mask=(experts < NUM_EXPERTS) & (in_chunk > 0))
    before = tl.cumsum(onehot, axis=0) - onehot
    rank = tl.sum(onehot * (before + base[None, :]), axis=1)
    tl.store(ranks_ptr + offs, rank, mask=valid)


@triton.jit(do_not_specialize=["num_assignments"])
def scatter_kernel(topk_ids_ptr, counts_ptr, ranks_ptr, sorted_ids_ptr, num_assignments,
                   NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_assignments, other=-1)
    experts = tl.arange(0, EXPERTS_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < NUM_EXPERTS, other=0)
    starts = tl.cumsum(counts, axis=0) - counts
    start = tl.sum(tl.where(ids[:, None] == experts[None, :], starts[None, :], 0), axis=1)
    rank = tl.load(ranks_ptr + offs, mask=offs < num_assignments, other=0)
    routed = (offs < num_assignments) & (ids >= 0) & (ids < NUM_EXPERTS)
    tl.store(sorted_ids_ptr + start + rank, offs, mask=routed)


@triton.jit
def _tile_rows(counts_ptr, tile, NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row in expert order, rows of that expert from there) of m-tile `tile`; the expert is
    NUM_EXPERTS or more for a tile past the last one."""
    experts = tl.arange(0, EXPERTS_PAD)
    counts = tl.load(counts_ptr + experts, mask=experts < NUM_EXPERTS, other=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(mine, tl.cumsum(counts, axis=0) - counts, 0), axis=0)
    rows = (tile - first_tile) * BLOCK_M
    return expert, row_start + rows, tl.sum(tl.where(mine, counts, 0), axis=0) - rows


@triton.jit(do_not_specialize=["top_k", "hidden", "inter"])
def gate_up_kernel(
    x_ptr, w_ptr, act_ptr, sorted_ids_ptr, counts_ptr, top_k, hidden, inter,
    stride_x, stride_we, stride_wn, stride_act,
    NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """act[row] = silu(x[token] @ gate[e].T) * (x[token] @ up[e].T) for BLOCK_M rows of expert e in expert order;
    w [E, 2 * inter, hidden] holds gate then up. gate and up are rounded to act's dtype before the epilogue, as
    an unfused projection would round them."""
    expert, row0, rows_left = _tile_rows(counts_ptr, tl.program_id(0), NUM_EXPERTS, EXPERTS_PAD, BLOCK_M)
    if expert >= NUM_EXPERTS:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows_left
    # Rows past the expert's last read its first token again (valid addresses, no mask) and are not stored.
    assignment = tl.load(sorted_ids_ptr + row0 + tl.where(row_ok, offs_m, 0))
    token = (assignment // top_k).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_x + offs_k[None, :]
    g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + (offs_n % inter)[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + inter * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a, g, u = tl.load(x_ptrs), tl.load(g_ptrs), tl.load(u_ptrs)
        else:
            k_ok = offs_k < hidden - k
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_gate = tl.dot(a, g, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    gate = acc_gate.to(act_ptr.dtype.element_ty).to(tl.float32)
    up = acc_up.to(act_ptr.dtype.element_ty).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    rows = (row0 + offs_m).to(tl.int64)
    tl.store(act_ptr + rows[:, None] * stride_act + offs_n[None, :], act.to(act_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["hidden", "inter"])
def down_kernel(
    act_ptr, w_ptr, y_ptr, sorted_ids_ptr, counts_ptr, hidden, inter,
    stride_act, stride_we, stride_wn, stride_y,
    NUM_EXPERTS: tl.constexpr, EXPERTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y[assignment] = act[row] @ down[e].T for BLOCK_M rows of expert e; w [E, hidden, inter]."""
    expert, row0, rows_left = _tile_rows(counts_ptr, tl.program_id(0), NUM_EXPERTS, EXPERTS_PAD, BLOCK_M)
    if expert >= NUM_EXPERTS:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows_left
    rows = (row0 + tl.where(row_ok, offs_m, 0)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_act + offs_k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + (offs_n % hidden)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, inter, BLOCK_K):
        if EVEN_K:
            a, w = tl.load(a_ptrs), tl.load(w_ptrs)
        else:
            k_ok = offs_k < inter - k
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    assignment = tl.load(sorted_ids_ptr + rows).to(tl.int64)
    tl.store(y_ptr + assignment[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["top_k", "hidden"])
def combine_kernel(y_ptr, weights_ptr, topk_ids_ptr, out_ptr, top_k, hidden, stride_y, stride_out,
                   NUM_EXPERTS: tl.constexpr, TOP_K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[token] = sum over k of weight[token, k] * y[token * top_k + k], in fp32, rounded once."""
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < hidden
    ks = tl.arange(0, TOP_K_PAD)
    slots = token * top_k + ks
    ids = tl.load(topk_ids_ptr + slots, mask=ks < top_k, other=-1)
    routed = (ks < top_k) & (ids >= 0) & (ids < NUM_EXPERTS)  # an unrouted slot's row was never written
    weight = tl.load(weights_ptr + slots, mask=routed, other=0.0).to(tl.float32)
    rows = tl.load(y_ptr + slots[:, None] * stride_y + offs_h[None, :], mask=routed[:, None] & h_ok[None, :],
                   other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs_h, tl.sum(rows * weight[:, None], axis=0).to(out_ptr.dtype.element_ty),
             mask=h_ok)


@dataclass
class Grouping:
    """The assignments in expert order: counts [E] and sorted_ids [tokens * top_k] (int32, on the device)."""

    counts: torch.Tensor
    sorted_ids: torch.Tensor


def _experts_pad(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def max_m_tiles(num_assignments: int, num_experts: int, block_m: int) -> int:
    """A bound on the m-tiles of any routing of `num_assignments`: each expert that gets a row rounds its rows
    up to a whole tile."""
    return (num_assignments + min(num_experts, num_assignments) * (block_m - 1)) // block_m


def group_by_expert(topk_ids: torch.Tensor, num_experts: int) -> Grouping:
    """Counting sort of the assignments (flattened [tokens, top_k]) by expert, on the device."""
    n = topk_ids.numel()
    pad = _experts_pad(num_experts)
    chunk = max(16, min(1024, _SORT_TILE // pad))
    counts = torch.zeros(num_experts, dtype=torch.int32, device=topk_ids.device)
    ranks = torch.empty(n, dtype=torch.int32, device=topk_ids.device)
    sorted_ids = torch.empty(n, dtype=torch.int32, device=topk_ids.device)
    grid = (triton.cdiv(n, chunk),)
    count_kernel[grid](topk_ids, counts, ranks, n, NUM_EXPERTS=num_experts, EXPERTS_PAD=pad, CHUNK=chunk)
    scatter_kernel[grid](topk_ids, counts, ranks, sorted_ids, n, NUM_EXPERTS=num_experts, EXPERTS_PAD=pad,
                         CHUNK=chunk)
    return Grouping(counts, sorted_ids)


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs are for checking: exact products, not TF32's 10-bit mantissas
    return "ieee" if dtype == torch.float32 else "tf32"


def gate_up(x: torch.Tensor, w13: torch.Tensor, grouping: Grouping, top_k: int, act: torch.Tensor,
            config: GemmConfig) -> None:
    """act [tokens * top_k, inter] (rows in expert order) = silu(gate) * up of every assignment."""
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    grid = (max_m_tiles(act.shape[0], num_experts, config.block_m), triton.cdiv(inter, config.block_n))
    gate_up_kernel[grid](
        x, w13, act, grouping.sorted_ids, grouping.counts, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        NUM_EXPERTS=num_experts, EXPERTS_PAD=_experts_pad(num_experts), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=hidden % config.block_k == 0,
        DOT_PRECISION=_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )


def down(act: torch.Tensor, w2: torch.Tensor, grouping: Grouping, y: torch.Tensor, config: GemmConfig) -> None:
    """y [tokens * top_k, hidden], row per assignment = act @ down[e].T."""
    num_experts, hidden, inter = w2.shape
    grid = (max_m_tiles(act.shape[0], num_experts, config.block_m), triton.cdiv(hidden, config.block_n))
    down_kernel[grid](
        act, w2, y, grouping.sorted_ids, grouping.counts, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        NUM_EXPERTS=num_experts, EXPERTS_PAD=_experts_pad(num_experts), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=inter % config.block_k == 0,
        DOT_PRECISION=_precision(act.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )


def combine(y: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
            out: torch.Tensor) -> None:
    """out [tokens, hidden] = each token's routing-weighted sum of its rows of y."""
    num_tokens, top_k = topk_ids.shape
    hidden = out.shape[1]
    block_h = min(1024, triton.next_power_of_2(hidden))
    combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_weights, topk_ids, out, top_k, hidden, y.stride(0), out.stride(0),
        NUM_EXPERTS=num_experts, TOP_K_PAD=triton.next_power_of_2(top_k), BLOCK_H=block_h,
        num_warps=max(1, min(8, block_h // 256)),
    )


def launch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor, out: torch.Tensor, config: MoEConfig) -> None:
    """The five launches on already validated arguments."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return
    num_experts, two_inter, hidden = w13.shape
    grouping = group_by_expert(topk_ids, num_experts)
    act = torch.empty(num_tokens * top_k, two_inter // 2, dtype=x.dtype, device=x.device)
    gate_up(x, w13, grouping, top_k, act, config.gate_up)
    y = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    down(act, w2, grouping, y, config.down)
    combine(y, topk_weights, topk_ids, num_experts, out)
