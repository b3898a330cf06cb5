"""`rotary_and_cache`: the Triton kernel (through the interpreter here) and the torch path against a float64
rotation; q rotated in place, rotated k and v in the cache at their slots, padding slots untouched; the cos/sin
table; bad arguments."""

import pytest
import torch

from tests.ops.helpers import NAN, bits, rel_err, triton_cast
from tritium.ops import rotary_and_cache, rotary_cos_sin_cache
from tritium.ops.kv_cache import quantize_fp8
from tritium.ops.rotary import _launch_rotary_and_cache, _rotary_and_cache_torch

FP8 = torch.float8_e4m3fn

# ||out - ref|| / ||ref|| against float64 on the same cos/sin table: one rotation in fp32, one rounding to the dtype.
BOUND = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MAX_POSITIONS = 512


def inv_freq(d: int, theta: float = 10000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()


def draw(num_tokens, hq, hkv, d, page, num_pages, dtype, gen, slot_dtype=torch.int64, pos_dtype=torch.int64):
    """q, k, v as views of one fused qkv projection; random positions; distinct slots, about a quarter of them -1;
    caches poisoned with NaN."""
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, v = split(qkv, hq, hkv, d)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(pos_dtype)
    slots = torch.randperm(num_pages * page, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = -1
    slots[0] = -1
    cache = torch.full((2, num_pages, page, hkv, d), NAN, dtype=dtype)
    return qkv, q, k, v, positions, slots.to(slot_dtype), cache[0], cache[1]


def split(qkv: torch.Tensor, hq: int, hkv: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of a fused qkv projection's output, as the model has them."""
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d)


def rotate64(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float64 rotate-half rotation of x [tokens, heads, d] with the table's cos/sin at each token's position."""
    half = x.shape[-1] // 2
    cos, sin = table.double()[positions.long()][:, None, :].chunk(2, dim=-1)
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def check(got, want, dtype, what):
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite values"
    err = rel_err(got, want)
    assert err < BOUND[dtype], f"{what}: relative error {err:.2e} >= {BOUND[dtype]:.0e}"


CASES = [  # dtype, q heads, kv heads, head size, page size, slot dtype, position dtype
    (torch.float32, 4, 2, 64, 16, torch.int64, torch.int64),
    (torch.float16, 6, 2, 128, 16, torch.int32, torch.int64),
    (torch.float32, 5, 5, 80, 8, torch.int64, torch.int32),
    (torch.float16, 7, 1, 112, 32, torch.int64, torch.int32),
    (torch.float32, 6, 3, 112, 16, torch.int32, torch.int32),
]


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize(("dtype", "hq", "hkv", "d", "page", "slot_dtype", "pos_dtype"), CASES)
def test_matches_float64(path, dtype, hq, hkv, d, page, slot_dtype, pos_dtype, gen):
    num_tokens, num_pages = 23, 3
    qkv, q, k, v, positions, slots, k_cache, v_cache = draw(num_tokens, hq, hkv, d, page, num_pages, dtype, gen,
                                                            slot_dtype, pos_dtype)
    table = rotary_cos_sin_cache(inv_freq(d), MAX_POSITIONS)
    want_q, want_k = rotate64(q, positions, table), rotate64(k, positions, table)
    k_before, v_before = k.clone(), v.clone()
    run = _launch_rotary_and_cache if path == "kernel" else _rotary_and_cache_torch
    run(q, k, v, positions, table, k_cache, v_cache, slots)

    check(q, want_q, dtype, "q")
    assert torch.equal(k, k_before) and torch.equal(v, v_before), "k and v (their part of qkv) were modified"
    valid = slots >= 0
    assert (~valid).any() and valid.any()
    written = slots[valid].long()
    blocks, offsets = written // page, written % page
    check(k_cache[blocks, offsets], want_k[valid], dtype, "k in the cache")
    assert torch.equal(v_cache[blocks, offsets], v[valid]), "v must be copied as it is"
    untouched = torch.ones(num_pages * page, dtype=torch.bool)
    untouched[written] = False
    for cache in (k_cache, v_cache):
        assert torch.isnan(cache.view(-1, hkv, d)[untouched]).all(), "a slot that no token names was written"


def test_kernel_matches_torch(gen):
    """Both paths on the same inputs, strided caches (K and V halves of one tensor, pages interleaved)."""
    num_tokens, hq, hkv, d, page, num_pages = 19, 6, 2, 80, 16, 3
    _, q, k, v, positions, slots, _, _ = draw(num_tokens, hq, hkv, d, page, num_pages, torch.float16, gen)
    kv = torch.full((num_pages, 2, page, hkv, d), NAN, dtype=torch.float16)
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    table = rotary_cos_sin_cache(inv_freq(d), MAX_POSITIONS)
    q_torch, kv_torch = q.clone(), kv.clone()
    _launch_rotary_and_cache(q, k, v, positions, table, k_cache, v_cache, slots)
    _rotary_and_cache_torch(q_torch, k, v, positions, table, kv_torch[:, 0], kv_torch[:, 1], slots)
    check(q, q_torch, torch.float16, "q")
    assert torch.equal(torch.isnan(kv), torch.isnan(kv_torch)), "the two paths wrote different slots"
    check(kv.nan_to_num(), kv_torch.nan_to_num(), torch.float16, "cache")


def test_all_slots_skipped(gen):
    _, q, k, v, positions, slots, k_cache, v_cache = draw(9, 4, 2, 64, 16, 2, torch.float32, gen)
    table = rotary_cos_sin_cache(inv_freq(64), MAX_POSITIONS)
    want_q = rotate64(q, positions, table)
    _launch_rotary_and_cache(q, k, v, positions, table, k_cache, v_cache, torch.full_like(slots, -1))
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all()
    check(q, want_q, torch.float32, "q of padding tokens")


def test_position_zero_is_identity(gen):
    _, q, k, v, positions, slots, k_cache, v_cache = draw(5, 2, 2, 48, 8, 1, torch.float32, gen)
    q_before = q.clone()
    _launch_rotary_and_cache(q, k, v, torch.zeros_like(positions), rotary_cos_sin_cache(inv_freq(48), 4), k_cache,
                             v_cache, slots)
    assert torch.equal(q, q_before)


def test_cos_sin_cache():
    """Row p: cos then sin of p * inv_freq, within float32's rounding of the angle (about |angle| * 6e-8)."""
    freqs = inv_freq(96, theta=500000.0)
    table = rotary_cos_sin_cache(freqs, 4096)
    assert table.shape == (4096, 96) and table.dtype == torch.float32
    angles = torch.arange(4096, dtype=torch.float64)[:, None] * freqs.double()[None, :]
    want = torch.cat([angles.cos(), angles.sin()], dim=-1)
    tol = 1e-6 + 1.2e-7 * torch.cat([angles, angles], dim=-1)
    assert ((table.double() - want).abs() <= tol).all()


def test_public_function_on_cpu(gen):
    """The public function on CPU tensors runs the torch path."""
    _, q, k, v, positions, slots, k_cache, v_cache = draw(7, 4, 2, 32, 4, 3, torch.float32, gen)
    table = rotary_cos_sin_cache(inv_freq(32), MAX_POSITIONS)
    q2, k_cache2, v_cache2 = q.clone(), k_cache.clone(), v_cache.clone()
    rotary_and_cache(q, k, v, positions, table, k_cache, v_cache, slots)
    _rotary_and_cache_torch(q2, k, v, positions, table, k_cache2, v_cache2, slots)
    assert torch.equal(q, q2) and torch.equal(bits(k_cache), bits(k_cache2))
    assert torch.equal(bits(v_cache), bits(v_cache2))


# --- an fp8 cache: x / scale, saturated, rounded to e4m3 ---


def fp8_case(dtype, hq, hkv, d, page, gen, num_tokens=23, num_pages=3):
    """draw()'s inputs with fp8 caches, and scales that saturate the largest rotated keys and values."""
    qkv, q, k, v, positions, slots, _, _ = draw(num_tokens, hq, hkv, d, page, num_pages, dtype, gen)
    k_cache, v_cache = torch.full((2, num_pages, page, hkv, d), NAN).to(FP8).unbind(0)
    k_scale = torch.tensor([k.float().abs().max().item() / 600.0])  # the largest rotated keys saturate
    v_scale = torch.tensor([v.float().abs().max().item() / 400.0])
    return q, k, v, positions, slots, k_cache, v_cache, k_scale, v_scale


def expected_fp8(k, v, positions, table, slots, k_cache, v_cache, k_scale, v_scale, cast=None):
    """The caches as they must be: the float32 rotation of k, and v, divided by the scale, saturated, rounded by
    `cast` (torch's rounding by default), at the valid slots; NaN elsewhere."""
    valid = slots >= 0
    rotated = rotate64(k, positions, table).float()[valid]
    want = []
    for cache, x, scale in ((k_cache, rotated, k_scale), (v_cache, v[valid].float(), v_scale)):
        y = quantize_fp8(x, scale) if cast is None else cast((x / scale).clamp(-448, 448), FP8)
        expected = cache.clone()
        expected.view(torch.uint8).view(-1, *cache.shape[2:])[slots[valid].long()] = y.view(torch.uint8)
        want.append(expected)
    return want


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize(("dtype", "hq", "hkv", "d", "page"), [(torch.float32, 4, 2, 64, 16),
                                                                (torch.float16, 6, 3, 80, 8),
                                                                (torch.bfloat16, 4, 1, 128, 16)])
def test_fp8_cache(path, dtype, hq, hkv, d, page, gen):
    """Each path writes what its own fp32 -> fp8 rounding gives: the torch path (the engine's on the CPU) torch's,
    bit for bit; the kernel in the interpreter Triton's interpreter's (which rounds some values wrongly; compiled
    kernels round in hardware, judged against torch in test_gpu_fp8_matches_torch). Saturated keys are +-448;
    q is rotated as with any cache."""
    q, k, v, positions, slots, k_cache, v_cache, k_scale, v_scale = fp8_case(dtype, hq, hkv, d, page, gen)
    table = rotary_cos_sin_cache(inv_freq(d), MAX_POSITIONS)
    want_q = rotate64(q, positions, table)
    rotated = rotate64(k, positions, table).float()
    assert (rotated / k_scale).abs().max() > 448, "no key saturates"
    cast = triton_cast if path == "kernel" else None
    want_k, want_v = expected_fp8(k, v, positions, table, slots, k_cache, v_cache, k_scale, v_scale, cast)
    run = _launch_rotary_and_cache if path == "kernel" else _rotary_and_cache_torch
    run(q, k, v, positions, table, k_cache, v_cache, slots, k_scale, v_scale)
    check(q, want_q, dtype, "q")
    if path == "torch" or dtype == torch.float32:
        assert torch.equal(bits(k_cache), bits(want_k))
    else:  # the rotation in the kernel and in float64 may differ in the last float32 bit, and so round apart
        assert (bits(k_cache) != bits(want_k)).float().mean() < 0.01
    assert torch.equal(bits(v_cache), bits(want_v))
    assert k_cache.float().nan_to_num().abs().max() == 448


def test_fp8_public_function_on_cpu_quantises_with_torch(gen):
    """The engine's CPU write: the public function on CPU tensors gives torch's quantisation bit for bit."""
    q, k, v, positions, slots, k_cache, v_cache, k_scale, v_scale = fp8_case(torch.float32, 4, 2, 32, 8, gen)
    table = rotary_cos_sin_cache(inv_freq(32), MAX_POSITIONS)
    want_k, want_v = expected_fp8(k, v, positions, table, slots, k_cache, v_cache, k_scale, v_scale)
    rotary_and_cache(q, k, v, positions, table, k_cache, v_cache, slots, k_scale, v_scale)
    assert torch.equal(bits(k_cache), bits(want_k)) and torch.equal(bits(v_cache), bits(want_v))


def _valid():
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    cache = torch.zeros(2, 16, 2, 32)
    return {"q": q, "k": k, "v": k.clone(), "positions": torch.arange(5), "cos_sin_cache": torch.ones(8, 32),
            "k_cache": cache, "v_cache": cache.clone(), "slot_mapping": torch.arange(5)}


def _strided_last(t):
    return torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]


ERRORS = {
    "q_not_tensor": ({"q": [1.0]}, r"^q must be a torch.Tensor"),
    "positions_not_tensor": ({"positions": [0, 1, 2, 3, 4]}, r"^positions must be a torch.Tensor"),
    "cache_device": ({"v_cache": torch.zeros(2, 16, 2, 32, device="meta")}, r"^v_cache is on meta"),
    "q_2d": ({"q": torch.randn(5, 128)}, r"^q must be float16/bfloat16/float32"),
    "q_int": ({"q": torch.ones(5, 4, 32, dtype=torch.int32)}, r"^q must be float16/bfloat16/float32"),
    "odd_head_size": ({"q": torch.randn(5, 4, 33)}, r"^q's head_size must be even"),
    "k_tokens": ({"k": torch.randn(4, 2, 32)}, r"^k must be torch.float32 \[5, num_kv_heads, 32\]"),
    "k_dtype": ({"k": torch.randn(5, 2, 32).half()}, r"^k must be torch.float32"),
    "v_head_size": ({"v": torch.randn(5, 2, 16)}, r"^v must be torch.float32 \[5, num_kv_heads, 32\]"),
    "k_v_heads": ({"v": torch.randn(5, 1, 32)}, r"^k and v must have the same shape"),
    "positions_shape": ({"positions": torch.arange(4)}, r"^positions must be int32/int64 of shape \(5,\)"),
    "positions_float": ({"positions": torch.arange(5.0)}, r"^positions must be int32/int64"),
    "slots_int16": ({"slot_mapping": torch.arange(5, dtype=torch.int16)}, r"^slot_mapping must be int32/int64"),
    "table_dtype": ({"cos_sin_cache": torch.ones(8, 32, dtype=torch.float16)}, r"^cos_sin_cache must be float32"),
    "table_width": ({"cos_sin_cache": torch.ones(8, 16)}, r"^cos_sin_cache must be float32 \[max_positions, 32\]"),
    "cache_shapes": ({"v_cache": torch.zeros(1, 16, 2, 32)}, r"^k_cache and v_cache must be matching"),
    "cache_heads": ({"k_cache": torch.zeros(2, 16, 4, 32), "v_cache": torch.zeros(2, 16, 4, 32)},
                    r"^k has \(heads, head_size\) \(2, 32\)"),
    "cache_float16": ({"k_cache": torch.zeros(2, 16, 2, 32).half(), "v_cache": torch.zeros(2, 16, 2, 32).half()},
                      r"^k_cache has dtype torch.float16 but k has torch.float32.*float8_e4m3fn"),
    "fp8_cache_no_scales": ({"k_cache": torch.zeros(2, 16, 2, 32).to(FP8),
                             "v_cache": torch.zeros(2, 16, 2, 32).to(FP8)},
                            r"^k_scale must be a float32 tensor with one element on cpu for an fp8 cache"),
    "fp8_cache_float16_scale": ({"k_cache": torch.zeros(2, 16, 2, 32).to(FP8),
                                 "v_cache": torch.zeros(2, 16, 2, 32).to(FP8), "k_scale": torch.ones(1),
                                 "v_scale": torch.ones(1).half()}, r"^v_scale must be a float32 tensor"),
    "q_strided": ({"q": _strided_last(torch.randn(5, 4, 32))}, r"^q must be contiguous"),
    "v_cache_strided": ({"k_cache": _strided_last(torch.zeros(2, 16, 2, 32)),
                         "v_cache": _strided_last(torch.zeros(2, 16, 2, 32))}, r"^k_cache must be contiguous"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name):
    args = _valid()
    rotary_and_cache(**args)  # valid as it is
    args["k_cache"].fill_(NAN)
    args["q"] = torch.randn(5, 4, 32)
    q = args["q"].clone()
    change, pattern = ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        rotary_and_cache(**{**args, **change})
    assert torch.isnan(args["k_cache"]).all() and torch.equal(args["q"], q), "a rejected call wrote something"


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("hq", "hkv", "d", "page"), [(32, 8, 128, 16), (28, 4, 128, 64), (20, 4, 80, 16),
                                                       (16, 1, 256, 32), (14, 2, 64, 16)])
def test_gpu_matches_torch(dtype, hq, hkv, d, page):
    """The kernel on CUDA (through the public function) against the torch path on the same CUDA tensors, at
    Llama-3-like positions up to 8191."""
    gen = torch.Generator().manual_seed(hq * d + page)
    num_tokens, num_pages = 700, 64
    qkv, q, k, v, _, slots, k_cache, v_cache = draw(num_tokens, hq, hkv, d, page, num_pages, dtype, gen)
    positions = torch.randint(0, 8192, (num_tokens,), generator=gen)
    table = rotary_cos_sin_cache(inv_freq(d, theta=500000.0), 8192)
    want_q, want_k = rotate64(q, positions, table), rotate64(k, positions, table)
    q, k, v = split(qkv.cuda(), hq, hkv, d)
    positions, slots, table, k_cache, v_cache = (t.cuda() for t in (positions, slots, table, k_cache, v_cache))
    q_torch, k_cache_torch, v_cache_torch = q.clone(), k_cache.clone(), v_cache.clone()
    rotary_and_cache(q, k, v, positions, table, k_cache, v_cache, slots)
    _rotary_and_cache_torch(q_torch, k, v, positions, table, k_cache_torch, v_cache_torch, slots)
    check(q, q_torch, dtype, "q vs torch")
    check(q, want_q, dtype, "q vs float64")
    assert torch.equal(torch.isnan(k_cache), torch.isnan(k_cache_torch)), "the two paths wrote different slots"
    assert torch.equal(v_cache.nan_to_num(), v_cache_torch.nan_to_num())
    check(k_cache.nan_to_num(), k_cache_torch.nan_to_num(), dtype, "k cache vs torch")
    valid = (slots >= 0).cpu()
    written = slots.cpu()[valid]
    check(k_cache.cpu()[written // page, written % page], want_k[valid], dtype, "k cache vs float64")


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("hq", "hkv", "d", "page"), [(32, 8, 128, 16), (20, 4, 80, 64), (16, 1, 256, 32)])
def test_gpu_fp8_matches_torch(dtype, hq, hkv, d, page):
    """The kernel's fp8 cache against torch's quantisation of the same rotation: equal except where the value sits
    within float32 rounding of a midpoint between two fp8 numbers (then one fp8 step apart); saturation at +-448."""
    gen = torch.Generator().manual_seed(hq * d + page)
    q, k, v, positions, slots, k_cache, v_cache, k_scale, v_scale = fp8_case(dtype, hq, hkv, d, page, gen,
                                                                             num_tokens=700, num_pages=64)
    positions = torch.randint(0, 8192, positions.shape, generator=gen)
    table = rotary_cos_sin_cache(inv_freq(d, theta=500000.0), 8192)
    want_k, want_v = expected_fp8(k, v, positions, table, slots, k_cache, v_cache, k_scale, v_scale)
    args = [t.cuda() for t in (q, k, v, positions, table, k_cache, v_cache, slots, k_scale, v_scale)]
    rotary_and_cache(*args)
    got_k, got_v = args[5].cpu(), args[6].cpu()
    for got, want in ((got_k, want_k), (got_v, want_v)):
        assert torch.equal(torch.isnan(got.float()), torch.isnan(want.float())), "different slots written"
        got, want = got.float().nan_to_num(), want.float().nan_to_num()
        differ = got != want
        one_step = (got - want).abs() <= (want.abs() / 8).clamp(min=2.0**-9)  # e4m3: 3 mantissa bits
        assert one_step[differ].all() and differ.float().mean() < 0.01, f"{int(differ.sum())} values differ"
    assert got_k.float().nan_to_num().abs().max() == 448
