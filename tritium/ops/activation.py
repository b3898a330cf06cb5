"""Gated activations of the MLP on the fused gate/up projection: `silu_and_mul` (Llama), silu(gate) * up, and
`gelu_and_mul` (Gemma's GeGLU), gelu_tanh(gate) * up."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZE = 1024  # most columns of the output one program computes
ACTIVATIONS = ("silu", "gelu_tanh")
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_x_token, INTERMEDIATE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        GELU: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < INTERMEDIATE
    gate = tl.load(x_ptr + token * stride_x_token + offs, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + token * stride_x_token + INTERMEDIATE + offs, mask=mask).to(tl.float32)
    if GELU:
        # tanh(z) = 1 - 2 / (1 + exp(2z)): exact at both ends (exp overflowing to inf gives 1)
        z = _SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    else:
        act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + token * INTERMEDIATE + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_act_and_mul(x: torch.Tensor, out: torch.Tensor, activation: str) -> None:
    """Run the kernel on a checked x; out is contiguous [tokens, intermediate] of x's dtype."""
    num_tokens, intermediate = out.shape
    if num_tokens == 0:
        return
    block = min(BLOCK_SIZE, triton.next_power_of_2(intermediate))
    grid = (num_tokens, (intermediate + block - 1) // block)
    _act_and_mul_kernel[grid](x, out, x.stride(0), INTERMEDIATE=intermediate, BLOCK_SIZE=block,
                              GELU=activation == "gelu_tanh", num_warps=max(1, block // 256))


def _act_and_mul_torch(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The same function in plain PyTorch: the CPU path, and the judge of the kernel in the tests."""
    gate, up = x.float().chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)
    return (act * up).to(x.dtype)


def _act_and_mul(x: torch.Tensor, activation: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] % 2 or not x.shape[1] or x.dtype not in DTYPES:
        raise ValueError(f"x must be float16/bfloat16/float32 [tokens, 2 * intermediate], "
                         f"got {tuple(x.shape)} {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dimension")
    if x.device.type != "cuda":
        return _act_and_mul_torch(x, activation)
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
    _launch_act_and_mul(x, out, activation)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [tokens, 2 * intermediate], gate then up (as the fused gate/up projection lays them out) ->
    silu(gate) * up [tokens, intermediate], computed in fp32 and rounded once to x's dtype."""
    return _act_and_mul(x, "silu")


def gelu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """As `silu_and_mul` with GELU's tanh approximation (Gemma's `gelu_pytorch_tanh`) in place of silu."""
    return _act_and_mul(x, "gelu_tanh")
