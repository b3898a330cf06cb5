"""`silu_and_mul` and `gelu_and_mul`: the Triton kernel (through the interpreter here) and the torch path against
float64; bad arguments."""

import math

import pytest
import torch

from tests.ops.helpers import NAN, rel_err
from tritium.ops import gelu_and_mul, silu_and_mul
from tritium.ops.activation import _act_and_mul_torch, _launch_act_and_mul

# ||out - ref|| / ||ref|| against float64: computed in fp32, rounded once to the dtype.
BOUND = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def draw(num_tokens, intermediate, dtype, gen, strided=False, device="cpu"):
    """x [tokens, 2 * intermediate] of gates and ups (a view with a wider row stride if `strided`); a few gates
    far out in both tails, where exp overflows or silu saturates."""
    wide = 3.0 * torch.randn(num_tokens, 2 * intermediate + (40 if strided else 0), generator=gen)
    wide[:, :3] = torch.tensor([-100.0, 60.0, -20.0])
    return wide.to(dtype).to(device)[:, : 2 * intermediate]


def reference(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    gate, up = x.double().chunk(2, dim=-1)
    if activation == "gelu_tanh":  # GELU's tanh approximation, as torch's gelu(approximate="tanh") defines it
        return 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) * up
    return gate * torch.sigmoid(gate) * up


def kernel(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The Triton kernel on any device, into an output poisoned with NaN."""
    out = torch.full((x.shape[0], x.shape[1] // 2), NAN, dtype=x.dtype, device=x.device)
    _launch_act_and_mul(x, out, activation)
    return out


def check(got, want, dtype, what):
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err < BOUND[dtype], f"{what}: relative error {err:.2e} >= {BOUND[dtype]:.0e}"


# exp(-gate) overflows to inf for gates far below zero, by design (silu -> -0); numpy in the interpreter says so.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(("dtype", "num_tokens", "intermediate", "strided", "activation"), [
    (torch.float32, 5, 80, False, "silu"),
    (torch.float16, 7, 112, True, "silu"),
    (torch.float32, 3, 1500, True, "silu"),  # two programs per token, the second partly masked
    (torch.float16, 4, 2048, False, "silu"),
    (torch.float32, 2, 3, False, "silu"),
    (torch.float32, 5, 80, True, "gelu_tanh"),
    (torch.float16, 3, 1500, False, "gelu_tanh"),
])
def test_kernel_and_torch_match_float64(dtype, num_tokens, intermediate, strided, activation, gen):
    x = draw(num_tokens, intermediate, dtype, gen, strided)
    want = reference(x, activation)
    out = kernel(x, activation)
    torch_out = _act_and_mul_torch(x, activation)
    assert out.shape == torch_out.shape == (num_tokens, intermediate)
    check(out, want, dtype, "kernel")
    check(torch_out, want, dtype, "torch")
    check(out, torch_out, dtype, "kernel vs torch")


def test_public_functions_on_cpu(gen):
    x = draw(6, 40, torch.float32, gen)
    assert torch.equal(silu_and_mul(x), _act_and_mul_torch(x, "silu"))
    assert torch.equal(gelu_and_mul(x), _act_and_mul_torch(x, "gelu_tanh"))
    assert not torch.equal(silu_and_mul(x), gelu_and_mul(x))


def test_no_tokens():
    assert kernel(torch.empty(0, 64)).shape == (0, 32)
    assert gelu_and_mul(torch.empty(0, 64)).shape == (0, 32)


ERRORS = {
    "not_tensor": ([[1.0, 2.0]], r"^x must be a torch.Tensor"),
    "1d": (torch.randn(8), r"^x must be float16/bfloat16/float32 \[tokens, 2 \* intermediate\]"),
    "3d": (torch.randn(2, 3, 8), r"^x must be float16/bfloat16/float32"),
    "odd": (torch.randn(3, 7), r"^x must be float16/bfloat16/float32"),
    "empty_rows": (torch.randn(3, 0), r"^x must be float16/bfloat16/float32"),
    "int": (torch.ones(3, 8, dtype=torch.int32), r"^x must be float16/bfloat16/float32"),
    "strided": (torch.randn(3, 16)[:, ::2], r"^x must be contiguous in its last dimension"),
}


@pytest.mark.parametrize("name", list(ERRORS))
@pytest.mark.parametrize("op", [silu_and_mul, gelu_and_mul])
def test_errors(name, op):
    x, pattern = ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        op(x)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("num_tokens", "intermediate"), [(300, 14336), (257, 11008), (1000, 768), (3, 3000)])
@pytest.mark.parametrize(("op", "activation"), [(silu_and_mul, "silu"), (gelu_and_mul, "gelu_tanh")])
def test_gpu_matches_torch(dtype, num_tokens, intermediate, op, activation):
    """The kernel on CUDA (through the public function) against the torch path on the same CUDA tensors."""
    x = draw(num_tokens, intermediate, dtype, torch.Generator().manual_seed(intermediate), strided=True, device="cuda")
    assert not x.is_contiguous()
    out = op(x)
    check(out, _act_and_mul_torch(x, activation), dtype, "kernel vs torch")
    check(out, reference(x.cpu(), activation), dtype, "kernel vs float64")
