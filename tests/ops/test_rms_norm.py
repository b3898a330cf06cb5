"""`rms_norm`: the Triton kernel (through the interpreter here) and the torch path against a float64 computation,
with and without the fused residual add, over hidden states and per-head q/k; bad arguments."""

import pytest
import torch

from tests.ops.helpers import NAN, rel_err
from tritium.ops import rms_norm
from tritium.ops.rms_norm import _launch_rms_norm, _rms_norm_torch

# ||out - ref|| / ||ref|| against float64: a few roundings to the dtype (the sum, the normalised value, the product).
BOUND = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def draw(shape, dtype, gen, residual: bool, strided: bool = False, device="cpu"):
    """x (a view with a wider row stride if `strided`), weight, residual (or None), all random and non-zero."""
    wide = (3.0 * torch.randn(*shape[:-1], shape[-1] + (24 if strided else 0), generator=gen) + 0.5).to(dtype)
    x = wide.to(device)[..., : shape[-1]]
    weight = (1.0 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype).to(device)
    res = torch.randn(shape, generator=gen).to(dtype).to(device) if residual else None
    return x, weight, res


def reference(x, weight, eps, residual, unit_offset=False):
    """float64 from the inputs: (normed, x + residual or None); Gemma's scale is 1 + weight."""
    s = x.double() if residual is None else x.double() + residual.double()
    scale = weight.double() + (1.0 if unit_offset else 0.0)
    normed = scale * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return normed, None if residual is None else s


def kernel(x, weight, eps, residual, unit_offset=False):
    """The Triton kernel on any device, into outputs poisoned with NaN."""
    out = torch.full(x.shape, NAN, dtype=x.dtype, device=x.device)
    residual_out = None if residual is None else torch.full_like(out, NAN)
    _launch_rms_norm(x, weight, eps, residual, out, residual_out, unit_offset)
    return out, residual_out


def check(got, want, dtype, what):
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err < BOUND[dtype], f"{what}: relative error {err:.2e} >= {BOUND[dtype]:.0e}"


CASES = [  # dtype, x's shape, with a residual, x a strided view
    (torch.float32, (7, 80), True, False),
    (torch.float16, (5, 112), True, True),
    (torch.float32, (3, 1000), False, True),
    (torch.float16, (4, 64), False, False),
    (torch.float32, (6, 3, 128), False, True),  # per-head q/k norm, 3 heads
    (torch.float16, (5, 4, 64), False, False),
    (torch.float32, (4, 2, 80), True, False),
]


@pytest.mark.parametrize(("dtype", "shape", "residual", "strided"), CASES)
def test_kernel_and_torch_match_float64(dtype, shape, residual, strided, gen):
    x, weight, res = draw(shape, dtype, gen, residual, strided)
    x_before, res_before = x.clone(), None if res is None else res.clone()
    eps = 1e-5
    want, want_res = reference(x, weight, eps, res)
    out, res_out = kernel(x, weight, eps, res)
    torch_out = _rms_norm_torch(x, weight, eps, res)
    torch_out, torch_res = (torch_out, None) if res is None else torch_out
    check(out, want, dtype, "kernel")
    check(torch_out, want, dtype, "torch")
    check(out, torch_out, dtype, "kernel vs torch")
    if residual:
        check(res_out, want_res, dtype, "kernel residual")
        assert torch.equal(res_out, torch_res), "x + residual is one fp32 add rounded once, in both paths"
    assert torch.equal(x, x_before) and (res is None or torch.equal(res, res_before)), "inputs were modified"


@pytest.mark.parametrize(("dtype", "shape", "residual", "strided"), [
    (torch.float32, (7, 80), True, False),
    (torch.float16, (3, 1000), False, True),
    (torch.float16, (5, 4, 64), False, False),  # Gemma 3's per-head q/k norm
])
def test_unit_offset_matches_float64(dtype, shape, residual, strided, gen):
    """Gemma's norm: weights near 0 scale by 1 + weight, in fp32 with one rounding, in the kernel and in torch."""
    x, weight, res = draw(shape, dtype, gen, residual, strided)
    weight = (weight.float() - 1.0).to(dtype)
    want, want_res = reference(x, weight, 1e-6, res, unit_offset=True)
    out, res_out = kernel(x, weight, 1e-6, res, unit_offset=True)
    torch_out = _rms_norm_torch(x, weight, 1e-6, res, unit_offset=True)
    torch_out = torch_out if res is None else torch_out[0]
    check(out, want, dtype, "kernel")
    check(torch_out, want, dtype, "torch")
    check(out, torch_out, dtype, "kernel vs torch")
    if residual:
        check(res_out, want_res, dtype, "kernel residual")
    public = rms_norm(x, weight, 1e-6, res, unit_offset=True)
    assert torch.equal(public if res is None else public[0], torch_out), "on the CPU the public function is torch's"


def test_public_function_on_cpu(gen):
    """The public function on CPU tensors runs the torch path, with and without a residual."""
    x, weight, res = draw((5, 48), torch.float32, gen, residual=True)
    assert torch.equal(rms_norm(x, weight, 1e-6), _rms_norm_torch(x, weight, 1e-6, None))
    out, new_res = rms_norm(x, weight, 1e-6, res)
    assert torch.equal(new_res, x + res) and torch.equal(out, _rms_norm_torch(x + res, weight, 1e-6, None))


def test_no_tokens():
    x = torch.empty(0, 64)
    out, res_out = kernel(x, torch.ones(64), 1e-6, x)
    assert out.shape == (0, 64) and res_out.shape == (0, 64)


def _valid():
    x = torch.randn(3, 4, 32)
    return {"x": x, "weight": torch.ones(32), "eps": 1e-6, "residual": torch.randn(3, 4, 32)}


ERRORS = {
    "x_not_tensor": ({"x": [[1.0]]}, r"^x must be a torch.Tensor"),
    "weight_not_tensor": ({"weight": 1.0}, r"^weight must be a torch.Tensor"),
    "x_1d": ({"x": torch.randn(32), "residual": None}, r"^x must be float16/bfloat16/float32"),
    "x_4d": ({"x": torch.randn(2, 3, 4, 32), "residual": None}, r"^x must be float16/bfloat16/float32"),
    "x_int": ({"x": torch.ones(3, 32, dtype=torch.int32), "weight": torch.ones(32, dtype=torch.int32),
               "residual": None}, r"^x must be float16/bfloat16/float32"),
    "weight_dtype": ({"weight": torch.ones(32, dtype=torch.float16)}, r"^weight has dtype torch.float16"),
    "weight_shape": ({"weight": torch.ones(16)}, r"^weight must have shape \(32,\)"),
    "weight_device": ({"weight": torch.ones(32, device="meta")}, r"^weight is on meta"),
    "residual_shape": ({"residual": torch.randn(3, 2, 32)}, r"^residual must have x's shape"),
    "residual_dtype": ({"residual": torch.randn(3, 4, 32).double()}, r"^residual has dtype torch.float64"),
    "residual_strided": ({"residual": torch.randn(3, 4, 64)[..., ::2]}, r"^residual must be contiguous"),
    "x_strided": ({"x": torch.randn(3, 4, 64)[..., ::2]}, r"^x must be contiguous"),
    "eps_zero": ({"eps": 0.0}, r"^eps must be a positive number"),
    "eps_tensor": ({"eps": torch.tensor(1e-6)}, r"^eps must be a positive number"),
    "too_wide": ({"x": torch.randn(2, 65537), "weight": torch.ones(65537), "residual": None},
                 r"^x has too many elements per token"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name):
    args = _valid()
    rms_norm(**args)  # valid as it is
    change, pattern = ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        rms_norm(**{**args, **change})


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("shape", "residual"), [((300, 4096), True), ((257, 5120), True), ((300, 32, 128), False),
                                                 ((129, 8, 128), False)])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_gpu_matches_torch(dtype, shape, residual, unit_offset):
    """The kernel on CUDA (through the public function) against the torch path on the same CUDA tensors."""
    gen = torch.Generator().manual_seed(shape[-1] + len(shape))
    x, weight, res = draw(shape, dtype, gen, residual, strided=True, device="cuda")
    assert not x.is_contiguous()
    got = rms_norm(x, weight, 1e-6, res, unit_offset)
    out, res_out = (got, None) if res is None else got
    want = _rms_norm_torch(x, weight, 1e-6, res, unit_offset)
    want, want_res = (want, None) if res is None else want
    check(out, want, dtype, "kernel vs torch")
    check(out, reference(x.cpu(), weight.cpu(), 1e-6, None if res is None else res.cpu(), unit_offset)[0], dtype,
          "vs float64")
    if residual:
        assert torch.equal(res_out, want_res)
