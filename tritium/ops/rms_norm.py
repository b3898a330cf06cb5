"""`rms_norm`: RMSNorm over the last dimension, optionally fused with the residual add before it; Gemma's variant
scales by (1 + weight)."""

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TILE = 65536  # elements of one token (heads x hidden, padded) that one program normalises


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps,
    stride_x_token, stride_x_head, stride_residual_token, stride_residual_head,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HIDDEN: tl.constexpr, HIDDEN_PAD: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HIDDEN_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HIDDEN)[None, :]
    src = token * stride_x_token + offs_h[:, None] * stride_x_head + offs_d[None, :]
    x = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    dst = token * (NUM_HEADS * HIDDEN) + offs_h[:, None] * HIDDEN + offs_d[None, :]  # outputs are contiguous
    if ADD_RESIDUAL:
        src = token * stride_residual_token + offs_h[:, None] * stride_residual_head + offs_d[None, :]
        # The sum is rounded to the stored dtype before it is normalised, as an unfused add would round it.
        x = (x + tl.load(residual_ptr + src, mask=mask, other=0.0).to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + dst, x, mask=mask)
        x = x.to(tl.float32)
    mean_square = tl.sum(x * x, axis=1) / HIDDEN
    normed = x * tl.rsqrt(mean_square + eps)[:, None]
    weight = tl.load(weight_ptr + offs_d, mask=offs_d < HIDDEN, other=0.0).to(tl.float32)
    if UNIT_OFFSET:  # Gemma: (1 + weight) in fp32, one rounding at the end
        out = normed * (1.0 + weight[None, :])
    else:  # Llama: the normalised value is rounded to the dtype before the weight
        out = normed.to(out_ptr.dtype.element_ty).to(tl.float32) * weight[None, :]
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                     out: torch.Tensor, residual_out: torch.Tensor | None, unit_offset: bool = False) -> None:
    """Run the kernel on checked arguments; out and residual_out are contiguous, of x's shape and dtype."""
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return
    x3 = x if x.dim() == 3 else x[:, None, :]
    res3 = x3 if residual is None else (residual if residual.dim() == 3 else residual[:, None, :])
    num_heads, hidden = x3.shape[1:]
    tile = triton.next_power_of_2(num_heads) * triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x3, res3, weight, out, out if residual_out is None else residual_out, float(eps),
        x3.stride(0), x3.stride(1), res3.stride(0), res3.stride(1),
        NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HIDDEN=hidden,
        HIDDEN_PAD=triton.next_power_of_2(hidden), ADD_RESIDUAL=residual is not None,
        UNIT_OFFSET=unit_offset, num_warps=max(1, min(16, tile // 512)),
    )


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                    unit_offset: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same function in plain PyTorch: the CPU path, and the judge of the kernel in the tests."""
    if residual is not None:
        x = residual = (x.float() + residual.float()).to(x.dtype)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        normed = (normed * (1.0 + weight.float())).to(x.dtype)
    else:
        normed = weight * normed.to(x.dtype)
    return normed if residual is None else (normed, residual)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    tensors = {"x": x, "weight": weight} if residual is None else {"x": x, "weight": weight, "residual": residual}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
        if t.dim() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if x.dim() not in (2, 3) or x.dtype not in DTYPES:
        raise ValueError(f"x must be float16/bfloat16/float32 [tokens, hidden] or [tokens, heads, head_size], "
                         f"got {tuple(x.shape)} {x.dtype}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's last dimension, "
                         f"got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    tile = triton.next_power_of_2(x.shape[1] if x.dim() == 3 else 1) * triton.next_power_of_2(x.shape[-1])
    if tile > MAX_TILE:
        raise ValueError(f"x has too many elements per token ({tuple(x.shape[1:])}, {tile} padded; at most "
                         f"{MAX_TILE})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             unit_offset: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * x / rms(x) over the last dimension of x [tokens, hidden] or [tokens, heads, head_size] (Qwen3's
    q/k norm), normalised in fp32 and rounded to x's dtype before the weight (as Hugging Face's RMSNorm). With a
    residual, x + residual is normalised instead and returned too: (normed, x + residual), one pass over memory.
    `unit_offset` is Gemma's norm: (1 + weight) * x / rms(x), all in fp32, rounded once.
    """
    _check(x, weight, eps, residual)
    if x.device.type != "cuda":
        return _rms_norm_torch(x, weight, eps, residual, unit_offset)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = None if residual is None else torch.empty_like(out)
    _launch_rms_norm(x, weight, eps, residual, out, residual_out, unit_offset)
    return out if residual is None else (out, residual_out)
