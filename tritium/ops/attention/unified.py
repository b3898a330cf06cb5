"""`unified_attention`: vLLM's calling convention over Tritium's kernel, with every argument checked first;
`prepare_attention` checks and plans a call once for many launches (one per layer)."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tritium.ops.attention import kernel
from tritium.ops.attention.configs import AttentionConfig, choose_config, has_fp8_dots, tables_generation
from tritium.ops.kv_cache import FP8_KV_DTYPE

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              FP8_KV_DTYPE: tl.float8e4nv}


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
    output_scale: torch.Tensor | None = None,
    return_lse: bool = False,
    config: AttentionConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Paged attention over a batch mixing prefills, prefill chunks, decodes and speculative tokens.

    q, out: [num_tokens, num_q_heads, head_size]; k, v: [num_pages, page_size, num_kv_heads, head_size]
    (fp8 e4m3 with per-tensor `k_descale`/`v_descale`, or q's dtype). As in vLLM, q may be fp8 e4m3 too, with its
    per-tensor `q_descale` (K/V then fp8 or any of float16/bfloat16/float32, out any of those), and out may be fp8
    e4m3 with an `output_scale`: it then holds the result divided by that scale, saturated to +-448. Scales are
    float32 tensors of one element; k/v descales of a cache that is not fp8 are ignored (vLLM passes them with any
    cache). Sequence i owns query tokens cu_seqlens_q[i]:cu_seqlens_q[i+1] and its first seqused_k[i] cached keys
    (new tokens included), found through block_table[i]; causal masks align bottom-right. window_size=(left, right)
    as in FlashAttention, (-1, -1) for none; softcap 0 for none; sinks are per-head logits joining the softmax.
    Tokens past cu_seqlens_q[-1] are padding and their rows of `out` are left as they are.
    Returns `out`, or (out, lse) with the natural-log log-sum-exp [num_q_heads, num_tokens] in float32.
    """
    return prepare_attention(
        q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal, window_size,
        block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes, sinks, output_scale=output_scale,
        return_lse=return_lse, config=config).run(q, k, v, out)


@dataclass(frozen=True)
class PreparedAttention:
    """A checked `unified_attention` call and its launch plan. `run` launches it on q/k/v/out of the shapes,
    dtypes and strides it was prepared with: the engine prepares each step once and runs it on every layer."""

    plan: "kernel.LaunchPlan | None"  # None: no query token or no sequence, nothing to launch
    q_shape: torch.Size
    kv_shape: torch.Size
    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    q_descale: torch.Tensor | None
    k_descale: torch.Tensor | None
    v_descale: torch.Tensor | None
    output_scale: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    sinks: torch.Tensor | None
    softmax_scale: float
    softcap: float
    window: tuple[int, int]
    return_lse: bool

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            k_descale: torch.Tensor | None = None, v_descale: torch.Tensor | None = None,
            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Launch on these tensors; k_descale/v_descale replace the prepared scales of an fp8 cache (each layer of a
        model has its own; like those prepared, float32 tensors of one element on q's device)."""
        if q.shape != self.q_shape or k.shape != self.kv_shape:
            raise ValueError(f"prepared for q {tuple(self.q_shape)} and caches {tuple(self.kv_shape)}, got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if self.return_lse else None
        if self.plan is not None:
            kernel.launch(self.plan, q=q, k_cache=k, v_cache=v, out=out, lse=lse, cu_seqlens_q=self.cu_seqlens_q,
                          seqused_k=self.seqused_k, block_table=self.block_table, alibi_slopes=self.alibi_slopes,
                          sinks=self.sinks, q_scale=self.q_descale,
                          k_scale=self.k_descale if k_descale is None or self.k_descale is None else k_descale,
                          v_scale=self.v_descale if v_descale is None or self.v_descale is None else v_descale,
                          out_scale=self.output_scale,
                          softmax_scale=self.softmax_scale, softcap=self.softcap, window=self.window)
        return (out, lse) if self.return_lse else out


def prepare_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int, seqused_k: torch.Tensor, max_seqlen_k: int, softmax_scale: float, causal: bool,
    window_size: tuple[int, int], block_table: torch.Tensor, softcap: float, q_descale: torch.Tensor | None,
    k_descale: torch.Tensor | None, v_descale: torch.Tensor | None, alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None, *, output_scale: torch.Tensor | None = None, return_lse: bool = False,
    config: AttentionConfig | None = None,
) -> PreparedAttention:
    """Check a `unified_attention` call (same arguments) and plan its launch, without launching it.

    The tensor checks and the plan depend only on shapes, dtypes, devices, strides and switches: they run once per
    such signature and are kept (an eager decode call otherwise spent more time in them than on the GPU).
    """
    window = _check_scalars(softmax_scale, softcap, window_size)
    key = (_signature(q), _signature(k), _signature(v), _signature(out), _signature(cu_seqlens_q),
           _signature(seqused_k), _signature(block_table), _signature(q_descale), _signature(k_descale),
           _signature(v_descale), _signature(alibi_slopes), _signature(sinks), _signature(output_scale),
           bool(causal), window != (-1, -1), softcap > 0, bool(return_lse), config, tables_generation())
    plan = _PLANS.get(key, _UNSEEN)
    if plan is _UNSEEN:
        _check(q, k, v, out, cu_seqlens_q, seqused_k, block_table, q_descale, k_descale, v_descale, alibi_slopes,
               sinks, output_scale)
        plan = plan_launch(q, k, v, out, cu_seqlens_q, causal, window, softcap, alibi_slopes is not None,
                           sinks is not None, return_lse, config)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    if block_table.shape[1] * k.shape[1] < max_seqlen_k:
        raise ValueError(f"block_table is too short: {block_table.shape[1]} blocks of {k.shape[1]} tokens cannot "
                         f"hold max_seqlen_k={max_seqlen_k} keys")
    fp8 = k.dtype == FP8_KV_DTYPE
    return PreparedAttention(
        plan=plan, q_shape=q.shape, kv_shape=k.shape, cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k,
        block_table=block_table, q_descale=q_descale if q.dtype == FP8_KV_DTYPE else None,
        k_descale=k_descale if fp8 else None, v_descale=v_descale if fp8 else None, output_scale=output_scale,
        alibi_slopes=alibi_slopes, sinks=sinks, softmax_scale=float(softmax_scale), softcap=float(softcap),
        window=window, return_lse=bool(return_lse))


# Launch plans by call signature. Eager engine steps bring a new token count each (a new signature), so the table
# is bounded; the engine itself prepares each step once (`models/attention.py`).
_PLANS: dict[tuple, "kernel.LaunchPlan | None"] = {}
_MAX_PLANS = 512
_UNSEEN = object()


def _signature(t: object) -> tuple | type:
    """What the checks and the plan read of an argument: a tensor's shape, strides, dtype and device."""
    if isinstance(t, torch.Tensor):
        return t.shape, t.stride(), t.dtype, t.device
    return type(t)


def plan_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, cu_seqlens_q: torch.Tensor, causal: bool,
    window: tuple[int, int], softcap: float, alibi: bool, sinks: bool, return_lse: bool,
    config: AttentionConfig | None = None,
) -> "kernel.LaunchPlan | None":
    """The launch plan of a checked batch: its config (`choose_config` unless given), grids and compile-time
    arguments; None for a batch with no query token or no sequence."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k.shape
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return None
    if config is None:
        config = choose_config(q.device, num_tokens, num_seqs, num_q_heads, num_kv_heads, head_dim, page_size,
                               kv_fp8=k.dtype == FP8_KV_DTYPE)
    group = num_q_heads // num_kv_heads
    config.validate(group)
    head_dim_pad = triton.next_power_of_2(head_dim)
    tokens_per_tile = config.block_m // group
    splits = config.num_splits
    dots = dot_dtype(q, k, config)
    constexprs = dict(
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, BLOCK_M=config.block_m,
        TOKENS_PER_TILE=tokens_per_tile, TILE_K=config.tile_k, PAGE_SIZE=page_size,
        TILE_IN_PAGE=page_size % config.tile_k == 0, PAGE_LOOKAHEAD=config.page_lookahead == 1,
        # float32 inputs are for checking: exact products, not TF32's 10-bit mantissas
        DOT_PRECISION="ieee" if dots == torch.float32 else "tf32", DOT_DTYPE=_TL_DTYPES[dots],
        Q_CLAMP=q.dtype == torch.bfloat16 and dots == torch.float16,
        Q_SCALED=q.dtype == FP8_KV_DTYPE, OUT_SCALED=out.dtype == FP8_KV_DTYPE,
        SPLIT_KEYS=splits > 1, CAUSAL=bool(causal), USE_WINDOW=window != (-1, -1), USE_SOFTCAP=softcap > 0,
        USE_ALIBI=alibi, USE_SINKS=sinks, KV_SCALED=k.dtype == FP8_KV_DTYPE, WRITE_LSE=bool(return_lse),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    merge_constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=triton.next_power_of_2(splits),
                            WRITE_LSE=bool(return_lse), OUT_SCALED=out.dtype == FP8_KV_DTYPE,
                            num_warps=4 if head_dim_pad >= 128 else 2)
    return kernel.LaunchPlan(
        config=config, grid=(num_tokens // tokens_per_tile + num_seqs, num_kv_heads, splits), constexprs=constexprs,
        merge_constexprs=merge_constexprs, head_dim_pad=head_dim_pad,
        use_tma=bool(config.tma) and kernel.tma_applies(q, k, v, config.tile_k))


def dot_dtype(q: torch.Tensor, k: torch.Tensor, config: AttentionConfig) -> torch.dtype:
    """The dtype of both dots' operands.

    A 16/32-bit query over 16/32-bit K/V: q's. A bfloat16 query over fp8 K/V: float16, which holds every e4m3 value
    and P exactly, and a bfloat16 query to within float16's range (the kernel clamps it there): sm_89+ converts fp8
    to float16 in one instruction and to bfloat16 only through float32. On the H200 that took an 8B-head decode over
    fp8 pages (64 x 8k) from 0.52 to 0.37 ms, each at its best config (docs/benchmarks.md). An fp8 query: fp8 where
    K/V are fp8 too, `config.fp8_dot` is on, the device has fp8 tensor cores, the head size and key tile are at
    least their 32-wide step and the tile has 64 rows or more; the K/V dtype where it is not fp8; else bfloat16 on a
    GPU and float32 in the interpreter (which computes bfloat16 dots wrongly). An fp8 query converts to each of them
    exactly.

    Below 64 rows (decode tiles) Triton's Hopper dot is mma.sync, which it gives fp8 operands converted to fp16
    (sm_90 PTX of a 16-row tile: m16n8k16 f16), so fp8 there would only round P; from 64 rows it is wgmma on e4m3."""
    if q.dtype != FP8_KV_DTYPE:
        return torch.float16 if q.dtype == torch.bfloat16 and k.dtype == FP8_KV_DTYPE else q.dtype
    if k.dtype != FP8_KV_DTYPE:
        return k.dtype
    if (config.fp8_dot and has_fp8_dots(q.device) and q.shape[2] > 16 and config.tile_k >= 32
            and config.block_m >= 64):
        return FP8_KV_DTYPE
    return torch.bfloat16 if q.device.type == "cuda" else torch.float32


def _check_scalars(softmax_scale: float, softcap: float, window_size: tuple[int, int]) -> tuple[int, int]:
    """Check the arguments that are numbers, not tensors; returns the window as two ints."""
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    if not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0 switches it off), got {softcap}")
    if len(window_size) != 2 or any(int(w) < -1 for w in window_size):
        raise ValueError(f"window_size must be (left, right) with each >= -1, got {window_size}")
    return int(window_size[0]), int(window_size[1])


def _check(q, k, v, out, cu_seqlens_q, seqused_k, block_table, q_descale, k_descale, v_descale, alibi_slopes,
           sinks, output_scale) -> None:
    """Raise a ValueError naming the first argument that the kernel cannot take."""
    tensors = {"q": q, "k": k, "v": v, "out": out, "cu_seqlens_q": cu_seqlens_q, "seqused_k": seqused_k,
               "block_table": block_table}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    fp8_q = q.dtype == FP8_KV_DTYPE
    if q.dtype not in SUPPORTED_DTYPES and not fp8_q:
        raise ValueError(f"q has dtype {q.dtype}; supported: float16, bfloat16, float32, float8_e4m3fn")
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_size], got shape {tuple(q.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    # An fp8 query's result comes out in any of the 16/32-bit types; the others' in their own dtype. Either may be
    # quantised to fp8 by an output_scale.
    out_dtypes = (*(SUPPORTED_DTYPES if fp8_q else (q.dtype,)), FP8_KV_DTYPE)
    if out.shape != q.shape or out.dtype not in out_dtypes:
        raise ValueError(f"out must match q: shape {tuple(q.shape)} dtype {' or '.join(map(str, out_dtypes))}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    kv_dtypes = (*(SUPPORTED_DTYPES if fp8_q else (q.dtype,)), FP8_KV_DTYPE)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [num_pages, page_size, num_kv_heads, head_size], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in kv_dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; it must be {' or '.join(map(str, kv_dtypes))} with a "
                             f"{q.dtype} q")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k and v must agree: {tuple(k.shape)} {k.dtype} vs {tuple(v.shape)} {v.dtype}")
    num_kv_heads = k.shape[2]
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
        raise ValueError(f"block_table must be [num_seqs >= {num_seqs}, max_pages], got {tuple(block_table.shape)}")
    if block_table.stride(1) != 1:
        raise ValueError("block_table must be contiguous in its last dimension")
    scales = []
    if k.dtype == FP8_KV_DTYPE:
        scales += [("k_descale", k_descale, "an fp8 cache"), ("v_descale", v_descale, "an fp8 cache")]
    if fp8_q:
        scales.append(("q_descale", q_descale, "an fp8 query"))
    elif q_descale is not None:
        raise ValueError(f"q_descale goes with an fp8 query; q has dtype {q.dtype}")
    if out.dtype == FP8_KV_DTYPE:
        scales.append(("output_scale", output_scale, "an fp8 output"))
    elif output_scale is not None:
        raise ValueError(f"output_scale goes with an fp8 out (quantised output); out has dtype {out.dtype}")
    for name, s, what in scales:
        if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype != torch.float32 or s.device != q.device:
            raise ValueError(f"{name} must be a float32 tensor with one element on {q.device} for {what}")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (num_q_heads,) or t.device != q.device:
            raise ValueError(f"{name} must be a tensor of shape ({num_q_heads},) on {q.device}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
