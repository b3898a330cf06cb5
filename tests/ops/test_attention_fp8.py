"""`unified_attention` with an fp8 query and an fp8 output on the CPU (Triton's interpreter), judged by the reference.

What the interpreter can check: an fp8 query (vLLM's q_descale) over fp8 and float K/V, with every feature, splits and
the merge, page/tile layouts and tensor descriptors; the dots then run in float32 (fp8 with fp8 K/V converts exactly)
or in the K/V dtype, as `dot_dtype` says. An fp8 output (vLLM's output_scale): the interpreter rounds fp32 to fp8
wrongly (see tests/ops/test_kv_cache.py), so on the CPU the fp8 output must be exactly the interpreter's own
conversion of the same call's float32 output divided by the scale and saturated: that checks the scale, the
saturation, the rows written and the merge; the rounding itself is judged on a GPU (test_attention_fp8_gpu.py).
fp8 tensor-core dots are a GPU's (they round P to fp8 too): the rule that picks them is checked here.
"""

import dataclasses

import pytest
import torch

import tritium.ops.attention.unified as unified
from tests.ops.helpers import (
    FP8,
    PLAIN,
    Features,
    attend,
    attend_and_check,
    bits,
    check_untouched_and_finite,
    draw_extras,
    poison_unused_table_entries,
    poisoned_like,
    reference,
    triton_cast,
)
from tests.ops.test_attention import FEATURES, MIXED
from tritium.ops import AttentionConfig, unified_attention
from tritium.ops.attention import kernel, prepare_attention
from tritium.ops.attention.batches import random_paged_batch

SEQS = [(1, 40), (0, 7), (5, 37), (12, 12), (9, 61), (1, 1), (3, 48), (2, 25)]


def batch_of(seqs, gen, hq=6, hkv=2, d=48, page=8, dtype=FP8, kv_dtype=None, pad=3):
    return poison_unused_table_entries(random_paged_batch(
        seqs, hq, hkv, d, page, dtype=dtype, kv_dtype=kv_dtype, pad_tokens=pad, generator=gen))


# --- an fp8 query ---


@pytest.mark.parametrize(("kv_dtype", "dots", "config", "features"), [
    (FP8, torch.float32, None, "causal_all"),
    (FP8, torch.float32, AttentionConfig(16, 16, num_splits=3), "noncausal_all"),
    (torch.float16, torch.float16, AttentionConfig(64, 32), "causal_all"),
    (torch.float32, torch.float32, AttentionConfig(32, 16, num_splits=2, page_lookahead=1), "plain"),
], ids=["fp8_kv", "fp8_kv_split3_noncausal", "fp16_kv_m64_k32", "fp32_kv_split2_pages_ahead"])
def test_fp8_query(kv_dtype, dots, config, features, gen, plans):
    """fp8 q with its scale (far from 1, so a missing one shows) over fp8 and float caches, every feature at once,
    causal and not, splits; the dots take float32 (or the cache's 16-bit type), into which fp8 converts exactly."""
    batch = batch_of(SEQS, gen, kv_dtype=kv_dtype)
    assert batch.q.dtype == FP8 and not 0.5 < batch.q_scale.item() < 2
    attend_and_check(batch, FEATURES.get(features, PLAIN), gen=gen, config=config)
    assert all(p.constexprs["DOT_DTYPE"] == unified._TL_DTYPES[dots] and p.constexprs["Q_SCALED"] for p in plans)


@pytest.mark.parametrize(("seqs", "hq", "hkv", "d"), [([(1, 1), (1, 17), (1, 64), (1, 100)], 8, 1, 64),
                                                      ([(37, 37), (16, 16)], 10, 2, 80), (MIXED, 4, 4, 128)],
                         ids=["decode_mqa_d64", "prefill_group5_d80", "mixed_mha_d128"])
def test_fp8_query_shapes(seqs, hq, hkv, d, gen):
    attend_and_check(batch_of(seqs, gen, hq=hq, hkv=hkv, d=d, page=16), Features(sinks=True), gen=gen)


def test_fp8_query_scale_is_applied(gen):
    """The same fp8 bits with another q scale give the other answer (the scale multiplies every score)."""
    batch = batch_of(SEQS, gen)
    batch.q_scale = batch.q_scale * 2.5
    attend_and_check(batch, gen=gen)


@pytest.mark.parametrize(("qdtype", "features", "config"), [
    (FP8, Features(sinks=True, window=(50, -1)), AttentionConfig(32, 32, num_splits=2, page_lookahead=1, tma=1)),
    (torch.float16, FEATURES["causal_all"], AttentionConfig(64, 32, tma=1)),
], ids=["fp8_q_split2", "fp16_q_all"])
def test_fp8_pages_through_tensor_descriptors(qdtype, features, config, gen, monkeypatch):
    """fp8 pages fetched by tensor descriptors (the interpreter emulates them): contexts end mid-tile and mid-page
    (the rest of the page NaN)."""
    built = []
    real = kernel.TensorDescriptor
    monkeypatch.setattr(kernel, "TensorDescriptor", lambda *a, **k: built.append(a[3]) or real(*a, **k))
    batch = batch_of([(1, 67), (4, 131), (0, 3), (9, 41), (20, 90)], gen, d=32, page=32, dtype=qdtype, kv_dtype=FP8)
    attend_and_check(batch, features, gen=gen, config=config)
    assert built == [[32, 32], [32, 32]]


def test_dot_dtype_rule(monkeypatch):
    """fp8 dots only where q and K/V are fp8, the config allows them, the device has them, the head size and key
    tile are at least 32 and the tile has 64 rows; otherwise bfloat16 on a GPU, float32 in the interpreter, or the
    cache's dtype. A bfloat16 query over fp8 K/V: float16."""
    q8 = torch.empty(2, 4, 64, dtype=FP8)
    k8, k16 = torch.empty(3, 16, 2, 64, dtype=FP8), torch.empty(3, 16, 2, 64, dtype=torch.bfloat16)
    wide, narrow = AttentionConfig(64, 64), AttentionConfig(64, 16)
    assert unified.dot_dtype(q8, k8, wide) == torch.float32  # the interpreter
    assert unified.dot_dtype(q8, k16, wide) == torch.bfloat16
    assert unified.dot_dtype(torch.empty(2, 4, 64, dtype=torch.float16), k8, wide) == torch.float16
    assert unified.dot_dtype(torch.empty(2, 4, 64, dtype=torch.bfloat16), k8, wide) == torch.float16
    assert unified.dot_dtype(torch.empty(2, 4, 64, dtype=torch.bfloat16), k16, wide) == torch.bfloat16
    monkeypatch.setattr(unified, "has_fp8_dots", lambda device: True)
    assert unified.dot_dtype(q8, k8, wide) == FP8
    assert unified.dot_dtype(q8, k8, dataclasses.replace(wide, fp8_dot=0)) == torch.float32
    assert unified.dot_dtype(q8, k8, narrow) == torch.float32  # a 16-key tile is below fp8's 32-wide step
    assert unified.dot_dtype(q8, k8, AttentionConfig(32, 64)) == torch.float32  # mma.sync rows: no fp8 form
    assert unified.dot_dtype(q8[..., :16], k8[..., :16], wide) == torch.float32  # head size 16 likewise
    assert unified.dot_dtype(q8, k16, wide) == torch.bfloat16


# --- an fp8 output ---


def _fp8_out_case(batch, features, extras, config, gen):
    """(float32 out, fp8 out, its scale): the same call twice; the scale saturates the largest outputs."""
    out32, lse32 = attend(batch, features, extras, config, out=poisoned_like(batch.q, torch.float32))
    n = batch.num_valid_tokens
    scale = torch.tensor([out32[:n].abs().max().item() / 600.0])
    out8, lse8 = attend(batch, features, extras, config, out=poisoned_like(batch.q, FP8), output_scale=scale)
    torch.testing.assert_close(lse8[:, :n], lse32[:, :n], rtol=0, atol=0)
    return out32, out8, scale


@pytest.mark.parametrize(("qdtype", "kv_dtype", "config", "features"), [
    (torch.float32, torch.float32, None, "causal_all"),
    (torch.float32, FP8, AttentionConfig(16, 16, num_splits=3), "noncausal_all"),
    (FP8, FP8, AttentionConfig(32, 32), "window_left_right_noncausal"),
    (FP8, torch.float32, AttentionConfig(16, 16, num_splits=2), "causal_all"),
], ids=["fp32_q", "fp32_q_fp8_kv_split3", "fp8_q_fp8_kv_m32_k32", "fp8_q_fp32_kv_split2"])
def test_fp8_output(qdtype, kv_dtype, config, features, gen):
    """out in fp8 with output_scale: the float32 result of the same call divided by the scale, saturated to +-448,
    converted as this backend converts (bit for bit); padding rows untouched; the float32 result itself is judged
    by the reference. Splits included (the merge quantises)."""
    batch = batch_of([(1, 40), (5, 37), (12, 12), (3, 25), (0, 4)], gen, hq=4, d=32, dtype=qdtype,
                     kv_dtype=kv_dtype)
    features = FEATURES[features]
    extras = draw_extras(batch, features, gen)
    out32, out8, scale = _fp8_out_case(batch, features, extras, config, gen)
    n = batch.num_valid_tokens
    ref, _ = reference(batch, features, extras)
    assert ((out32[:n].double() - ref[:n]).norm() / ref[:n].norm()).item() < 2e-5
    want = triton_cast((out32[:n] / scale).clamp(-448, 448), FP8)
    assert torch.equal(bits(out8[:n]), bits(want))
    assert out8[:n].float().abs().max() == 448, "no output saturated"
    check_untouched_and_finite(batch, out8.float())


# --- argument errors ---


ERRORS = {
    "fp8_q_without_scale": (lambda a: {"q_descale": None},
                            r"^q_descale must be a float32 tensor with one element on cpu for an fp8 query"),
    "fp8_q_two_scales": (lambda a: {"q_descale": torch.ones(2)}, r"^q_descale must be a float32 tensor"),
    "fp8_q_float16_scale": (lambda a: {"q_descale": torch.ones(1).half()}, r"^q_descale must be a float32 tensor"),
    "q_descale_with_fp16_q": (lambda a: {"q": a["q"].half(), "out": a["out"].half(), "k": a["k"].half(),
                                         "v": a["v"].half()}, r"^q_descale goes with an fp8 query"),
    "fp8_out_without_scale": (lambda a: {"out": a["out"].to(FP8)},
                              r"^output_scale must be a float32 tensor with one element on cpu for an fp8 output"),
    "output_scale_with_float_out": (lambda a: {"output_scale": torch.ones(1)}, r"^output_scale goes with an fp8 out"),
    "float16_q_float32_out": (lambda a: {"q": a["q"].half(), "out": a["out"], "q_descale": None,
                                         "k": a["k"].half(), "v": a["v"].half()}, r"^out must match q"),
    "fp8_q_int_out": (lambda a: {"out": a["out"].int()}, r"^out must match q"),
    "fp8_q_float64_kv": (lambda a: {"k": a["k"].double(), "v": a["v"].double()}, r"^k has dtype torch.float64"),
    "q_float8_e5m2": (lambda a: {"q": a["q"].to(torch.float8_e5m2)}, r"^q has dtype torch.float8_e5m2"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name, gen):
    batch = random_paged_batch([(3, 20), (1, 7)], 4, 2, 32, 16, dtype=FP8, pad_tokens=1, generator=gen)
    names = ["q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale",
             "causal", "window_size", "block_table", "softcap", "q_descale", "k_descale", "v_descale"]
    args = dict(zip(names, batch.kernel_args(poisoned_like(batch.q)), strict=True))
    prepare_attention(**args)  # valid as it is (checked, not launched)
    change, pattern = ERRORS[name]
    args.update(change(args))
    with pytest.raises(ValueError, match=pattern):
        unified_attention(**args)
