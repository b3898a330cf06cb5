"""`unified_attention` with fp8 queries, fp8 K/V pages and fp8 outputs compiled for a CUDA GPU, at real sizes.

The kernel runs on the GPU; the float64 (or float32) reference on the CPU judges it, on every row of small batches
and on sampled sequences and rows of large ones (`check_sampled`). Where the device has fp8 tensor cores (compute
capability 8.9+), an fp8 query over fp8 pages takes fp8 dots in tiles of 64 rows or more (`dot_dtype`; bound:
OUT_BOUND[fp8]); `fp8_dot=0` makes the same call in bfloat16 dots (bound: OUT_BOUND[bfloat16]). An fp8 output is
judged dequantised (times its scale) against the reference, and, with an fp8 query, against torch's quantisation
of the same call's float32 output.
"""

import dataclasses

import pytest
import torch

from tests.ops.helpers import (
    FP8,
    NAN,
    OUT_BOUND,
    PLAIN,
    Features,
    attend,
    check_close,
    check_sampled,
    check_untouched_and_finite,
    draw_extras,
    load_into,
    poisoned_like,
    reference,
    static_like,
    sub_batch,
)
from tests.ops.test_attention_gpu import FEATURE_SEQS, FEATURES, MIXED, _decode_rounds, _mixed_rounds, contexts, make
from tritium.ops import AttentionConfig, unified_attention
from tritium.ops.attention import kernel
from tritium.ops.attention.configs import choose_config, has_tma
from tritium.ops.attention.unified import dot_dtype

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = torch.bfloat16
FEATURE_PICKS = [0, (1, 0, 64), (1, 448, 512), 2, (3, 0, 40), (3, 636, 700), 4]


def bound(batch, config: AttentionConfig | None = None) -> float:
    """The output bound of the dots this call runs: fp8's or bfloat16's."""
    return OUT_BOUND[FP8 if dot_dtype(batch.q, batch.k_cache, config or default_config(batch)) == FP8 else BF16]


def default_config(batch) -> AttentionConfig:
    num_tokens, hq, d = batch.q.shape
    return choose_config(batch.q.device, num_tokens, batch.seqused_k.numel(), hq, batch.k_cache.shape[2], d,
                         batch.k_cache.shape[1])


def run(batch, features=PLAIN, config=None):
    """The kernel on the GPU into a NaN-poisoned bfloat16 output; returns (out, lse, the features' tensors)."""
    extras = draw_extras(batch, features, torch.Generator().manual_seed(0))
    out, lse = attend(batch, features, extras, config, out=poisoned_like(batch.q, BF16))
    torch.cuda.synchronize()
    return out, lse, extras


@pytest.mark.parametrize("kv_dtype", [FP8, BF16], ids=["fp8_kv", "bf16_kv"])
@pytest.mark.parametrize("fp8_dot", [1, 0], ids=["fp8_dots", "bf16_dots"])
@pytest.mark.parametrize(("kind", "features"), [
    ("decode", PLAIN), ("decode", Features(sinks=True, alibi=True)), ("mixed", PLAIN),
    ("mixed", FEATURES["everything"]), ("mixed", Features(sinks=True, window=(700, 0))),
    ("mixed", FEATURES["noncausal_window"]), ("mixed", FEATURES["softcap"]),
], ids=["decode", "decode_sinks_alibi", "mixed", "mixed_everything", "mixed_window_sinks", "noncausal_window",
        "softcap"])
def test_fp8_query(kv_dtype, fp8_dot, kind, features, plans):
    """fp8 q with its scale over fp8 and bfloat16 pages: decodes (64 contexts up to 2500: key splits and the merge),
    a mixed batch (a 512-token chunk, a 700-token prefill, decodes), with the features."""
    seqs = [(1, c) for c in contexts(64, 1, 2500, seed=8)] if kind == "decode" else FEATURE_SEQS
    batch = make(seqs, dtype=FP8, kv_dtype=kv_dtype, pad=2)
    config = dataclasses.replace(default_config(batch), fp8_dot=fp8_dot)
    fp8_dots = dot_dtype(batch.q, batch.k_cache, config) == FP8
    if kind == "mixed" and fp8_dot and kv_dtype == FP8 and torch.cuda.get_device_capability() >= (9, 0):
        assert fp8_dots, f"a mixed batch's {config} takes no fp8 dots on this Hopper-class GPU"
    out, lse, extras = run(batch, features, config)
    picks = sorted({0, 5, 17, 40, 63}) if kind == "decode" else (FEATURE_PICKS if features.causal else [0, 2, 4])
    check_sampled(batch, out, lse, picks, features, extras, bound=bound(batch, config),
                  what=f"{kind} {features} fp8_dot={fp8_dot}")
    dot = plans[-1].constexprs["DOT_DTYPE"]
    assert (dot.is_fp8() if fp8_dots else dot.primitive_bitwidth == 16), dot


@pytest.mark.parametrize(("qdtype", "kind", "features"), [
    (BF16, "decode", PLAIN), (BF16, "mixed", FEATURES["everything"]), (FP8, "decode", Features(sinks=True)),
    (FP8, "mixed", PLAIN), (FP8, "mixed", FEATURES["noncausal_window"]),
], ids=["bf16_q_decode", "bf16_q_mixed_everything", "fp8_q_decode_sinks", "fp8_q_mixed", "fp8_q_noncausal_window"])
def test_fp8_output(qdtype, kind, features):
    """out in fp8 with an output_scale over fp8 pages (decodes take key splits: the merge quantises): dequantised,
    within the dots' bound plus fp8's rounding (an e4m3 step is up to 2^-4 of a value) of the reference; outputs
    well past 448 * scale saturated at +-448; padding rows untouched. With an fp8 query the same call can write
    float32: the fp8 output is then torch's quantisation of it, but where a value lies within float32 rounding of a
    midpoint between two fp8 numbers (the GPU divides by the scale approximately): there one e4m3 step apart."""
    seqs = [(1, c) for c in contexts(64, 1, 2500, seed=9)] if kind == "decode" else FEATURE_SEQS
    batch = make(seqs, dtype=qdtype, kv_dtype=FP8, pad=3)
    picks = sorted({0, 9, 33, 63}) if kind == "decode" else (FEATURE_PICKS if features.causal else [0, 2, 4])
    extras = draw_extras(batch, features, torch.Generator().manual_seed(0))
    sub, rows = sub_batch(batch, picks, causal=features.causal)
    ref, _ = reference(sub, features, extras)
    scale = torch.tensor([ref.abs().max().item() / 560.0], device="cuda")  # the largest outputs saturate
    out, lse = attend(batch, features, extras, out=poisoned_like(batch.q, FP8), output_scale=scale)
    torch.cuda.synchronize()
    check_untouched_and_finite(batch, out.float(), lse)
    got = out[rows.cuda()].float().cpu()
    check_close(got.double() * scale.item(), ref, None, None, BF16, bound=bound(batch) + 0.04, what="dequantised")
    saturated = (ref.abs() / scale.item()) > 500
    assert saturated.any() and (got[saturated].abs() == 448).all()
    if qdtype == FP8:
        out32, _ = attend(batch, features, extras, out=poisoned_like(batch.q, torch.float32))
        n = batch.num_valid_tokens
        y = (out32[:n] / scale).clamp(-448, 448)
        want, got = y.to(FP8).float(), out[:n].float()
        differ = got != want
        near_tie = (y - (got + want) / 2).abs() <= 4e-7 * y.abs()
        one_step = (got - want).abs() <= (want.abs() / 8).clamp(min=2.0**-9)
        assert (near_tie & one_step)[differ].all() and differ.float().mean() < 1e-2


@pytest.mark.parametrize(("page", "config"), [
    (64, AttentionConfig(64, 64, num_stages=3, page_lookahead=1, tma=1)),
    (64, AttentionConfig(16, 64, num_splits=4, num_stages=3, tma=1)),
], ids=["p64_m64", "p64_decode_split4"])
@pytest.mark.parametrize("qdtype", [BF16, FP8], ids=["bf16_q", "fp8_q"])
def test_fp8_pages_through_tensor_descriptors(page, config, qdtype, monkeypatch):
    """fp8 pages fetched by the tensor-memory accelerator (Hopper): contexts end mid-page, stale table entries point
    at NaN pages."""
    built = []
    real = kernel.TensorDescriptor
    monkeypatch.setattr(kernel, "TensorDescriptor", lambda *a, **k: built.append(a[3]) or real(*a, **k))
    batch = make(MIXED + [(1000, 3100), (64, 64)], page=page, dtype=qdtype, kv_dtype=FP8, pad=5)
    features = Features(sinks=True, window=(400, -1))
    out, lse, extras = run(batch, features, config)
    check_sampled(batch, out, lse, list(range(len(MIXED) + 2)), features, extras, bound=bound(batch, config),
                  ref_dtype=torch.float32)
    assert len(built) == (2 if has_tma(batch.q.device) else 0)


@pytest.mark.parametrize(("kind", "config"), [("decode", None), ("decode", AttentionConfig(16, 64, num_splits=4)),
                                              ("mixed", None)], ids=["decode", "decode_split4", "mixed"])
@pytest.mark.parametrize("qdtype", [BF16, FP8], ids=["bf16_q", "fp8_q"])
def test_cuda_graph_replay_fp8(kind, config, qdtype):
    """One capture over fp8 pages (and an fp8 query, and an fp8 output), replayed with new lengths, pages and
    scales copied into the same tensors."""
    num_tokens, num_seqs = (64, 32) if kind == "decode" else (600, 10)
    rounds = (_decode_rounds if kind == "decode" else _mixed_rounds)(num_tokens, num_seqs)
    batches = [make(seqs, hq=16, hkv=2, d=128, dtype=qdtype, kv_dtype=FP8, pad=num_tokens - sum(q for q, _ in seqs),
                    seed=30 + i) for i, seqs in enumerate(rounds)]
    static = static_like(batches[0], max(b.k_cache.shape[0] for b in batches) + 3,
                         max(b.block_table.shape[1] for b in batches) + 1)
    features = Features(sinks=True)
    extras = draw_extras(static, features, torch.Generator().manual_seed(1))
    out = poisoned_like(static.q, FP8)
    out_scale = torch.ones(1, device="cuda")

    def call():
        return unified_attention(*static.kernel_args(out), None, extras.sinks, output_scale=out_scale,
                                 return_lse=True, config=config)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = call()
    out_bound = bound(static, config) + 0.04
    for batch in batches + batches[:1]:
        loaded = load_into(static, batch)
        ref, ref_lse = reference(loaded, features, extras, dtype=torch.float32)
        n = loaded.num_valid_tokens
        out_scale.fill_(ref[:n].abs().max().item() / 400.0)
        out.copy_(torch.full(out.shape, NAN, device="cuda").to(FP8))
        graph.replay()
        torch.cuda.synchronize()
        what = f"replay of {batch.cu_seqlens_q.diff().tolist()}"
        check_untouched_and_finite(loaded, out.float(), lse, what)
        check_close(out[:n].float() * out_scale, ref[:n], lse[:, :n], ref_lse[:, :n], BF16, bound=out_bound,
                    lse_bound=2e-3, what=what)
