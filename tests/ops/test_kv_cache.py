"""`write_kv_cache` on the CPU (Triton interpreter): slots, skipped tokens, fp8 quantisation, and a round trip
through `unified_attention`."""

import os

import pytest
import torch

from tests.ops.helpers import NAN, OUT_BOUND, bits, check, reference, triton_cast
from tritium.ops import unified_attention, write_kv_cache
from tritium.ops.attention.batches import PagedBatch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"




def poisoned_cache(num_pages, page, hkv, d, dtype):
    return tuple(torch.full((num_pages, page, hkv, d), NAN).to(dtype) for _ in range(2))


def random_slots(num_tokens, num_pages, page, gen, skipped=0.25, dtype=torch.int64):
    """Distinct random slots, about `skipped` of them -1 (padding tokens)."""
    slots = torch.randperm(num_pages * page, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < skipped] = -1
    return slots.to(dtype)


def expected_cache(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`cache` with values[i] at slot slots[i] for every slot >= 0; the rest untouched."""
    expected = cache.clone()
    keep = slots >= 0
    flat = expected.view(-1, *cache.shape[2:])
    flat[slots[keep].long()] = values[keep]
    return expected


def quantize(x: torch.Tensor, scale: torch.Tensor, cast=None) -> torch.Tensor:
    """x / scale saturated to fp8's range, converted by `cast` (torch's, by default)."""
    y = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX)
    return y.to(FP8) if cast is None else cast(y, FP8)


# --- unquantized caches ---


@pytest.mark.parametrize(("dtype", "page", "hkv", "d", "slot_dtype"), [
    (torch.float16, 16, 3, 80, torch.int32),
    (torch.float32, 64, 4, 64, torch.int64),
    (torch.float16, 64, 1, 128, torch.int64),
    (torch.float32, 16, 3, 80, torch.int32),
    (torch.float16, 16, 5, 48, torch.int64),
    (torch.bfloat16, 16, 2, 16, torch.int32),  # a plain copy: bfloat16 is fine here
])
def test_write(dtype, page, hkv, d, slot_dtype, gen):
    num_pages, num_tokens = 7, 50
    key = torch.randn(num_tokens, hkv, d, generator=gen).to(dtype)
    value = torch.randn(num_tokens, hkv, d, generator=gen).to(dtype)
    k_cache, v_cache = poisoned_cache(num_pages, page, hkv, d, dtype)
    slots = random_slots(num_tokens, num_pages, page, gen, dtype=slot_dtype)
    assert (slots == -1).any() and (slots >= 0).any()
    want_k, want_v = expected_cache(k_cache, slots, key), expected_cache(v_cache, slots, value)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(bits(k_cache), bits(want_k))
    assert torch.equal(bits(v_cache), bits(want_v))


def test_all_slots_skipped(gen):
    key = torch.randn(9, 2, 32, generator=gen)
    k_cache, v_cache = poisoned_cache(2, 16, 2, 32, torch.float32)
    write_kv_cache(key, key.clone(), k_cache, v_cache, torch.full((9,), -1, dtype=torch.int32))
    assert torch.isnan(k_cache).all() and torch.isnan(v_cache).all()


def test_no_tokens():
    key = torch.empty(0, 2, 32)
    k_cache, v_cache = poisoned_cache(2, 16, 2, 32, torch.float32)
    write_kv_cache(key, key, k_cache, v_cache, torch.empty(0, dtype=torch.int64))
    assert torch.isnan(k_cache).all()


def test_strided_key_value(gen):
    """key and value as views of one fused qkv projection (vLLM's layout), caches as halves of one tensor."""
    num_tokens, hq, hkv, d, page = 20, 6, 3, 80, 16
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, generator=gen).to(torch.float16)
    key = qkv[:, hq * d: (hq + hkv) * d].view(num_tokens, hkv, d)
    value = qkv[:, (hq + hkv) * d:].view(num_tokens, hkv, d)
    assert not key.is_contiguous()
    kv = torch.full((2, 4, page, hkv, d), NAN, dtype=torch.float16)
    k_cache, v_cache = kv.unbind(0)
    slots = random_slots(num_tokens, 4, page, gen)
    want_k, want_v = expected_cache(k_cache, slots, key), expected_cache(v_cache, slots, value)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(bits(kv[0]), bits(want_k)) and torch.equal(bits(kv[1]), bits(want_v))


# --- fp8 caches ---


def _fp8_case(src_dtype, page, hkv, d, slot_dtype, gen, num_pages=6, num_tokens=60):
    key = (3.0 * torch.randn(num_tokens, hkv, d, generator=gen)).to(src_dtype)
    value = torch.randn(num_tokens, hkv, d, generator=gen).to(src_dtype)
    # Scales that saturate the largest keys and leave values well inside fp8's range.
    k_scale = torch.tensor([key.float().abs().max().item() / 600.0])
    v_scale = torch.tensor([value.float().abs().max().item() / 200.0])
    assert (key.float() / k_scale).abs().max() > FP8_MAX
    k_cache, v_cache = poisoned_cache(num_pages, page, hkv, d, FP8)
    slots = random_slots(num_tokens, num_pages, page, gen, dtype=slot_dtype)
    return key, value, k_cache, v_cache, slots, k_scale, v_scale


FP8_CASES = [
    (torch.float16, 16, 3, 80, torch.int32),
    (torch.float32, 64, 3, 80, torch.int64),
    (torch.bfloat16, 16, 2, 64, torch.int64),
    (torch.float16, 64, 4, 128, torch.int32),
]


@pytest.mark.parametrize(("src_dtype", "page", "hkv", "d", "slot_dtype"), FP8_CASES)
def test_write_fp8(src_dtype, page, hkv, d, slot_dtype, gen):
    """Slots, skipping, division by the scale and saturation; the fp32 -> e4m3 rounding is the backend's own
    (judged against torch in test_write_fp8_matches_torch)."""
    key, value, k_cache, v_cache, slots, k_scale, v_scale = _fp8_case(src_dtype, page, hkv, d, slot_dtype, gen)
    want_k = expected_cache(k_cache, slots, quantize(key, k_scale, triton_cast))
    want_v = expected_cache(v_cache, slots, quantize(value, v_scale, triton_cast))
    write_kv_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    assert torch.equal(bits(k_cache), bits(want_k))
    assert torch.equal(bits(v_cache), bits(want_v))
    written = k_cache.view(-1, hkv, d)[slots[slots >= 0].long()].float()
    assert written.abs().max() == FP8_MAX, "saturated keys must be stored as +-448"


@pytest.mark.xfail(INTERPRETED, strict=True, reason=(
    "Triton's interpreter rounds fp32 -> float8e4nv wrongly (_convert_float ORs the rounding carry into the "
    "exponent: 7.92 -> 4.0, 1.99 -> 1.0, 124.4 -> 64.0; ties round away from zero; subnormals truncate). "
    "Compiled kernels use the hardware conversion."))
@pytest.mark.parametrize(("src_dtype", "page", "hkv", "d", "slot_dtype"), FP8_CASES[:2])
def test_write_fp8_matches_torch(src_dtype, page, hkv, d, slot_dtype, gen):
    key, value, k_cache, v_cache, slots, k_scale, v_scale = _fp8_case(src_dtype, page, hkv, d, slot_dtype, gen)
    want_k = expected_cache(k_cache, slots, quantize(key, k_scale))
    want_v = expected_cache(v_cache, slots, quantize(value, v_scale))
    write_kv_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    assert torch.equal(bits(k_cache), bits(want_k))
    assert torch.equal(bits(v_cache), bits(want_v))


# --- round trip: write a batch's keys and values, then attend over them ---


def _round_trip(kv_dtype, qdtype, gen, page=16, hq=6, hkv=2, d=80):
    """Sequences (query_len, context): a chunk on a cached prefix, a decode, a prefill, one of context 1.
    Their keys/values go into a fresh cache in two writes (the cached prefixes, then the new tokens with
    padding), through shuffled pages; returns the batch and the keys/values as written (unquantized)."""
    seqs = [(10, 45), (1, 23), (17, 17), (1, 1)]
    pad = 3
    blocks = [-(-ctx // page) for _, ctx in seqs]
    num_pages = sum(blocks) + 2
    order = torch.randperm(num_pages, generator=gen)
    table = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    keys = [torch.randn(ctx, hkv, d, generator=gen).to(qdtype) for _, ctx in seqs]
    values = [torch.randn(ctx, hkv, d, generator=gen).to(qdtype) for _, ctx in seqs]
    k_cache, v_cache = poisoned_cache(num_pages, page, hkv, d, kv_dtype)
    scales = {}
    if kv_dtype == FP8:
        scales = {"k_scale": torch.tensor([max(k.float().abs().max().item() for k in keys) / 300.0]),
                  "v_scale": torch.tensor([max(v.float().abs().max().item() for v in values) / 300.0])}
    taken = 0
    prefix_slots, new_slots = [], []
    for i, (q_len, ctx) in enumerate(seqs):
        table[i, : blocks[i]] = order[taken: taken + blocks[i]].to(torch.int32)
        taken += blocks[i]
        slots = table[i].long()[torch.arange(ctx) // page] * page + torch.arange(ctx) % page
        prefix_slots.append(slots[: ctx - q_len])
        new_slots.append(slots[ctx - q_len:])
    split = [ctx - q_len for q_len, ctx in seqs]
    cat = torch.cat
    # First write: the cached prefixes (int64 slots); second: the new tokens plus padding (int32 slots).
    write_kv_cache(cat([k[:s] for k, s in zip(keys, split, strict=True)]),
                   cat([v[:s] for v, s in zip(values, split, strict=True)]),
                   k_cache, v_cache, cat(prefix_slots), **scales)
    pad_kv = torch.randn(pad, hkv, d, generator=gen).to(qdtype)
    write_kv_cache(cat([k[s:] for k, s in zip(keys, split, strict=True)] + [pad_kv]),
                   cat([v[s:] for v, s in zip(values, split, strict=True)] + [pad_kv]),
                   k_cache, v_cache, cat(new_slots + [torch.full((pad,), -1)]).to(torch.int32), **scales)
    num_tokens = sum(q for q, _ in seqs) + pad
    cu = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0).to(torch.int32)
    batch = PagedBatch(
        q=torch.randn(num_tokens, hq, d, generator=gen).to(qdtype), k_cache=k_cache, v_cache=v_cache,
        cu_seqlens_q=cu, seqused_k=torch.tensor([c for _, c in seqs], dtype=torch.int32), block_table=table,
        max_seqlen_q=max(q for q, _ in seqs), max_seqlen_k=max(c for _, c in seqs), **scales)
    return batch, keys, values


@pytest.mark.parametrize(("kv_dtype", "qdtype"), [
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
    (FP8, torch.float16),
    (FP8, torch.float32),
], ids=["fp16", "fp32", "fp8_fp16q", "fp8_fp32q"])
def test_round_trip_through_attention(kv_dtype, qdtype, gen):
    batch, keys, values = _round_trip(kv_dtype, qdtype, gen)
    # Every slot of every context was written; the rest of the pool is still NaN.
    for i, ctx in enumerate(batch.seqused_k.tolist()):
        pages = batch.block_table[i, : -(-ctx // 16)].long()
        written = batch.k_cache[pages].reshape(-1, *batch.k_cache.shape[2:])[:ctx]
        assert torch.isfinite(written.float()).all()
        if kv_dtype != FP8:
            assert torch.equal(written, keys[i])
    out = torch.full_like(batch.q, NAN)
    result, lse = unified_attention(*batch.kernel_args(out), return_lse=True)
    ref, ref_lse = reference(batch)  # on the cache as written: dequantized with the scales when fp8
    check(batch, out, ref, lse, ref_lse, bound=OUT_BOUND[qdtype])


# --- argument errors ---


def _valid_write(gen, kv_dtype=torch.float32):
    key = torch.randn(5, 2, 32, generator=gen)
    k_cache, v_cache = poisoned_cache(2, 16, 2, 32, kv_dtype)
    args = {"key": key, "value": key.clone(), "k_cache": k_cache, "v_cache": v_cache,
            "slot_mapping": torch.arange(5)}
    if kv_dtype == FP8:
        args.update(k_scale=torch.tensor([0.01]), v_scale=torch.tensor([0.01]))
    return args


def _strided_last(t):
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    return wide[..., ::2]


WRITE_ERRORS = {
    "key_not_tensor": (lambda a: {"key": a["key"].tolist()}, r"^key must be a torch.Tensor"),
    "slots_not_tensor": (lambda a: {"slot_mapping": list(range(5))}, r"^slot_mapping must be a torch.Tensor"),
    "cache_other_device": (lambda a: {"v_cache": a["v_cache"].to("meta")}, r"^v_cache is on meta"),
    "key_2d": (lambda a: {"key": a["key"][0], "value": a["value"][0]}, r"^key and value must both be"),
    "key_value_shapes": (lambda a: {"value": a["value"][:4]}, r"^key and value must both be"),
    "cache_3d": (lambda a: {"k_cache": a["k_cache"][0], "v_cache": a["v_cache"][0]}, r"^k_cache and v_cache must"),
    "cache_shapes": (lambda a: {"v_cache": a["v_cache"][:1]}, r"^k_cache and v_cache must"),
    "cache_dtypes": (lambda a: {"v_cache": a["v_cache"].double()}, r"^k_cache and v_cache must"),
    "cache_heads": (lambda a: {"k_cache": a["k_cache"][:, :, :1], "v_cache": a["v_cache"][:, :, :1]},
                    r"^key has .*\(2, 32\)"),
    "cache_head_size": (lambda a: {"k_cache": a["k_cache"][..., :16], "v_cache": a["v_cache"][..., :16]},
                        r"^key has .*\(2, 32\)"),
    "slots_shape": (lambda a: {"slot_mapping": a["slot_mapping"][:4]}, r"^slot_mapping must be int32/int64"),
    "slots_2d": (lambda a: {"slot_mapping": a["slot_mapping"][None]}, r"^slot_mapping must be int32/int64"),
    "slots_float": (lambda a: {"slot_mapping": a["slot_mapping"].float()}, r"^slot_mapping must be int32/int64"),
    "slots_int16": (lambda a: {"slot_mapping": a["slot_mapping"].short()}, r"^slot_mapping must be int32/int64"),
    "key_dtype": (lambda a: {"key": a["key"].half(), "value": a["value"].half()},
                  r"^k_cache has dtype torch.float32 but key has torch.float16"),
    "key_not_contiguous": (lambda a: {"key": _strided_last(a["key"])}, r"^key must be contiguous"),
    "cache_not_contiguous": (lambda a: {"k_cache": _strided_last(a["k_cache"]),
                                        "v_cache": _strided_last(a["v_cache"])}, r"^k_cache must be contiguous"),
}


@pytest.mark.parametrize("name", list(WRITE_ERRORS))
def test_write_errors(name, gen):
    args = _valid_write(gen)
    write_kv_cache(**args)  # valid as it is
    k_cache = args["k_cache"].fill_(NAN)
    change, pattern = WRITE_ERRORS[name]
    args.update(change(args))
    with pytest.raises(ValueError, match=pattern):
        write_kv_cache(**args)
    assert torch.isnan(k_cache).all(), "a rejected call wrote the cache"


FP8_WRITE_ERRORS = {
    "no_k_scale": ({"k_scale": None}, r"^k_scale must be a float32 tensor"),
    "no_v_scale": ({"v_scale": None}, r"^v_scale must be a float32 tensor"),
    "float_scale": ({"k_scale": 0.01}, r"^k_scale must be a float32 tensor"),
    "float16_scale": ({"v_scale": torch.tensor([0.01], dtype=torch.float16)}, r"^v_scale must be a float32"),
    "two_scales": ({"k_scale": torch.tensor([0.01, 0.02])}, r"^k_scale must be a float32 tensor"),
    "scale_on_meta": ({"k_scale": torch.tensor([0.01], device="meta")}, r"^k_scale must be a float32 tensor"),
}


@pytest.mark.parametrize("name", list(FP8_WRITE_ERRORS))
def test_write_fp8_errors(name, gen):
    args = _valid_write(gen, FP8)
    write_kv_cache(**args)  # valid as it is
    change, pattern = FP8_WRITE_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        write_kv_cache(**{**args, **change})
