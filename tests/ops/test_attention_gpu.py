"""`unified_attention` and `write_kv_cache` compiled for a CUDA GPU, at realistic sizes.

Selected with `pytest -m gpu` on a GPU machine (the default run deselects the `gpu` marker). Batches are
built on the CPU by `random_paged_batch` (shuffled pages, NaN in unused cache slots) and moved to the GPU;
the kernel runs on the GPU; the reference runs on the CPU in float64, or float32 for long contexts, over
every row of small batches and a sample of sequences and query rows (`check_sampled`) of large ones.
"""

import functools

import pytest
import torch

from tests.ops.helpers import (
    NAN,
    PLAIN,
    Features,
    attend,
    check_close,
    check_sampled,
    check_untouched_and_finite,
    draw_extras,
    load_into,
    poison_unused_table_entries,
    reference,
    rel_err,
    static_like,
)
from tritium.ops import AttentionConfig, unified_attention, write_kv_cache
from tritium.ops.attention import kernel
from tritium.ops.attention.batches import random_paged_batch
from tritium.ops.attention.configs import has_tma

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16, FP16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
DTYPES = pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])


def make(seqs, hq=32, hkv=8, d=128, page=16, dtype=BF16, kv_dtype=None, pad=0, seed=0):
    """A random paged batch on the GPU whose unused block-table entries point at a page of NaN."""
    return poison_unused_table_entries(random_paged_batch(
        seqs, hq, hkv, d, page, dtype=dtype, device="cuda", kv_dtype=kv_dtype, pad_tokens=pad,
        generator=torch.Generator().manual_seed(seed)))


def contexts(n, lo, hi, seed):
    return torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def sample(n, k, seed):
    """k of n sequence indices, always the first and the last."""
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return sorted(set(picked) | {0, n - 1})


def run(batch, picks=None, features=PLAIN, config=None, seed=0, ref_dtype=torch.float64, bound=None, what=""):
    """Kernel on the GPU, reference on the CPU for `picks` (every sequence by default); returns (out, lse)."""
    extras = draw_extras(batch, features, torch.Generator().manual_seed(seed))
    out, lse = attend(batch, features, extras, config)
    torch.cuda.synchronize()
    picks = list(range(batch.seqused_k.numel())) if picks is None else picks
    check_sampled(batch, out, lse, picks, features, extras, bound=bound, ref_dtype=ref_dtype,
                  what=what or f"{features} {config}")
    return out, lse


# --- decode ---


@DTYPES
def test_decode_b256_ctx1k(dtype):
    seqs = [(1, c) for c in contexts(256, 900, 1100, seed=1)]
    batch = make(seqs, dtype=dtype, pad=3)
    run(batch, sample(256, 24, seed=2))


LONG_CONTEXTS = contexts(28, 1, 32768, seed=3) + [1, 32767, 32768, 16385]


@functools.cache
def long_decode_batch():
    """32 decodes of contexts up to 32k (built once: the tests only read it)."""
    return make([(1, c) for c in LONG_CONTEXTS], page=16)


@pytest.mark.parametrize("config", [None, AttentionConfig(16, 64, num_splits=8)], ids=["default", "split8"])
def test_decode_b32_up_to_32k(config):
    run(long_decode_batch(), [0, 5, 17, 28, 29, 30, 31], config=config, ref_dtype=torch.float32)


@functools.cache
def decode_128k_batch():
    return make([(1, 3), (1, 131072), (1, 40000)], hq=8, hkv=1, page=64, pad=5)


@pytest.mark.parametrize("config", [None, AttentionConfig(16, 64, num_splits=1)], ids=["default", "nosplit"])
def test_decode_128k(config):
    run(decode_128k_batch(), config=config, ref_dtype=torch.float32)


@pytest.mark.parametrize("splits", [1, 2, 4, 8, 16])
def test_decode_splits(splits):
    """Forced key splits on a decode batch of long contexts: every count gives the reference's answer."""
    batch = make([(1, c) for c in contexts(16, 4000, 9000, seed=4)], hq=16, hkv=2)
    run(batch, config=AttentionConfig(16, 64, num_splits=splits), features=Features(sinks=True))


def test_spec_q4_b64():
    batch = make([(4, c) for c in contexts(64, 5, 3000, seed=5)], pad=7)
    run(batch, ref_dtype=torch.float32)


# --- prefill, chunked prefill, mixed ---


@DTYPES
def test_prefill_1x4k(dtype):
    batch = make([(4096, 4096)], dtype=dtype, pad=7)
    run(batch, [(0, 0, 64), (0, 2011, 2101), (0, 4000, 4096)])


def test_prefill_8x1k():
    batch = make([(1024, 1024)] * 8, hq=16, hkv=16, d=64, page=32)
    run(batch, [0] + [(i, 1000 - 37 * i, 1024) for i in range(1, 8)])


def test_chunked_prefill_4x2k_on_2k():
    batch = make([(2048, 4096)] * 4, pad=1)
    run(batch, [p for i in range(4) for p in ((i, 0, 32), (i, 2016 - 100 * i, 2048 - 100 * i))])


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_mixed_2k_chunk_and_127_decodes(dtype):
    seqs = [(2048, 3048)] + [(1, c) for c in contexts(127, 1, 4000, seed=6)]
    batch = make(seqs, dtype=dtype, pad=9)
    run(batch, [(0, 0, 16), (0, 1500, 1540), (0, 2040, 2048)] + sample(128, 30, seed=7)[1:])


# --- shapes: GQA, head sizes, page sizes ---

MIXED = [(1, 1500), (7, 700), (300, 300), (200, 1200), (4, 64), (1, 1), (0, 50), (1, 517)]


@pytest.mark.parametrize(("hq", "hkv", "d", "page", "dtype"), [
    (32, 8, 128, 16, BF16),  # GQA 32:8
    (8, 1, 128, 32, FP16),  # GQA 8:1
    (16, 16, 64, 64, BF16),  # MHA
    (20, 4, 80, 128, FP16),  # group 5
    (12, 2, 96, 256, BF16),  # group 6
    (28, 4, 112, 16, BF16),  # group 7
    (16, 4, 192, 32, BF16),
    (8, 2, 256, 64, FP16),
    (64, 4, 128, 16, BF16),  # group 16
    (64, 2, 128, 16, BF16),  # group 32: block_m above 16
], ids=lambda v: str(v).replace("torch.", ""))
def test_shapes(hq, hkv, d, page, dtype):
    batch = make(MIXED, hq=hq, hkv=hkv, d=d, page=page, dtype=dtype, pad=5)
    run(batch)


# --- features ---

FEATURES = {
    "window_1k": Features(window=(1023, 0)),
    "window_1k_left_only": Features(window=(1024, -1)),
    "softcap": Features(softcap=30.0, scale=0.5),
    "alibi": Features(alibi=True),
    "sinks": Features(sinks=True),
    "noncausal": Features(causal=False),
    "noncausal_window": Features(causal=False, window=(128, 128)),
    "noncausal_window_left": Features(causal=False, window=(300, -1)),
    "noncausal_window_right": Features(causal=False, window=(-1, 20)),
    "everything": Features(window=(1023, 0), softcap=20.0, alibi=True, sinks=True, scale=0.2),
}
FEATURE_SEQS = [(1, 3000), (512, 2048), (4, 1500), (700, 700), (1, 1), (0, 9)]


@pytest.mark.parametrize("name", list(FEATURES))
def test_features(name):
    features = FEATURES[name]
    batch = make(FEATURE_SEQS, pad=3)
    if features.causal:
        picks = [0, (1, 0, 64), (1, 448, 512), 2, (3, 0, 40), (3, 636, 700), 4]
    else:
        picks = [0, (1, 448, 512), 2, (3, 636, 700), 4]
    run(batch, picks, features)


# --- fp8 cache ---


@pytest.mark.parametrize(("dtype", "kind", "features"), [
    (BF16, "decode", PLAIN),
    (BF16, "mixed", PLAIN),
    (BF16, "mixed", FEATURES["everything"]),
    (FP16, "mixed", Features(sinks=True, window=(700, 0))),
], ids=["bf16_decode", "bf16_mixed", "bf16_mixed_everything", "fp16_mixed_window_sinks"])
def test_fp8_cache(dtype, kind, features):
    seqs = [(1, c) for c in contexts(64, 1, 2500, seed=8)] if kind == "decode" else FEATURE_SEQS
    batch = make(seqs, dtype=dtype, kv_dtype=FP8, pad=2)
    picks = None if kind == "decode" else [0, (1, 0, 64), (1, 448, 512), 2, (3, 636, 700), 4]
    run(batch, picks, features)


# --- forced configurations ---


@pytest.mark.parametrize("config", [
    AttentionConfig(16, 16),
    AttentionConfig(16, 64, num_splits=4, num_warps=4, num_stages=3),
    AttentionConfig(32, 32, num_splits=2),
    AttentionConfig(64, 64, num_stages=3),
    AttentionConfig(128, 64, num_warps=8, num_stages=3),
    AttentionConfig(128, 32, num_splits=3, num_warps=8),
], ids=lambda c: f"m{c.block_m}_k{c.tile_k}_s{c.num_splits}_w{c.num_warps}_st{c.num_stages}")
def test_forced_configs(config):
    batch = make(MIXED, pad=5)
    run(batch, config=config, features=Features(sinks=True, window=(400, -1)))


# --- K/V through tensor descriptors (config.tma) ---


@pytest.mark.parametrize(("page", "config", "dtype"), [
    (64, AttentionConfig(64, 64, num_stages=3, page_lookahead=1, tma=1), BF16),
    (64, AttentionConfig(128, 64, num_warps=8, num_stages=3, page_lookahead=1, tma=1), FP16),
    (128, AttentionConfig(128, 128, num_warps=8, num_stages=3, page_lookahead=1, tma=1), BF16),
    (64, AttentionConfig(16, 64, num_splits=4, num_stages=3, tma=1), BF16),
    (32, AttentionConfig(32, 32, num_splits=2, tma=1), FP16),
], ids=["p64_m64", "p64_m128_fp16", "p128_m128", "p64_decode_split4", "p32_m32_split2"])
@pytest.mark.parametrize("features", [PLAIN, Features(sinks=True, window=(400, -1)), Features(causal=False, alibi=True,
                                                                                              softcap=20.0)],
                         ids=["plain", "window_sinks", "noncausal_alibi_softcap"])
def test_tma_configs(page, config, dtype, features, monkeypatch):
    """Tiles fetched by the tensor-memory accelerator: contexts end mid-page (the rest of the page is NaN) and
    mid-tile, stale block-table entries point at NaN pages; every kind of sequence in one batch."""
    built = []
    real = kernel.TensorDescriptor
    monkeypatch.setattr(kernel, "TensorDescriptor", lambda *a, **k: built.append(a[3]) or real(*a, **k))
    batch = make(MIXED + [(1000, 3100), (64, 64)], page=page, dtype=dtype, pad=5)
    run(batch, config=config, features=features)
    assert len(built) == (2 if has_tma(batch.q.device) else 0)


# --- float32 ---


def test_float32():
    """float32 queries and cache must give float32 accuracy (the interpreter's bound is 2e-5; allow 1e-4).
    Computing the float32 dot products in TF32 (tl.dot's default) gives about 1e-3."""
    batch = make(MIXED, dtype=torch.float32, pad=5)
    run(batch, bound=1e-4)


# --- CUDA graphs: one capture, replayed with new sequence lengths in the same tensors ---


def _decode_rounds(num_tokens, num_seqs):
    half = num_seqs // 2
    return [
        [(1, c) for c in contexts(num_seqs, 1, 4000, seed=10)],
        [(2, c) for c in contexts(half, 2, 3000, seed=11)] + [(1, c) for c in contexts(half, 1, 50, seed=12)],
        [(4, 4000), (0, 17), (0, 0)] + [(1, c) for c in contexts(num_seqs - 3, 3000, 4000, seed=13)],
        [(1, 1)] * num_seqs,
    ]


def _mixed_rounds(num_tokens, num_seqs):
    return [
        [(400, 900)] + [(1, c) for c in contexts(num_seqs - 1, 1, 3000, seed=14)],
        [(100, 100), (250, 2000), (3, 50), (0, 7)] + [(2, c) for c in contexts(num_seqs - 4, 2, 2500, seed=15)],
        [(num_tokens - num_seqs + 1, num_tokens - num_seqs + 1)] + [(1, 4000)] * (num_seqs - 1),
        [(60, 3000)] * num_seqs,
    ]


@pytest.mark.parametrize(("kind", "config", "page"), [
    ("decode", None, 16),
    ("decode", AttentionConfig(16, 64, num_splits=4), 16),
    ("mixed", None, 16),
    ("mixed", AttentionConfig(64, 64, num_stages=3, page_lookahead=1, tma=1), 64),
], ids=["decode_default", "decode_split4", "mixed_default", "mixed_tma_page64"])
def test_cuda_graph_replay(kind, config, page):
    num_tokens, num_seqs = (64, 32) if kind == "decode" else (600, 10)
    hq, hkv, d = 16, 2, 128
    rounds = (_decode_rounds if kind == "decode" else _mixed_rounds)(num_tokens, num_seqs)
    batches = []
    for i, seqs in enumerate(rounds):
        assert len(seqs) == num_seqs and sum(q for q, _ in seqs) <= num_tokens, seqs
        pad = num_tokens - sum(q for q, _ in seqs)
        batches.append(make(seqs, hq=hq, hkv=hkv, d=d, page=page, pad=pad, seed=20 + i))
    num_blocks = max(b.k_cache.shape[0] for b in batches) + 3
    max_blocks = max(b.block_table.shape[1] for b in batches) + 1
    static = static_like(batches[0], num_blocks, max_blocks)
    extras = draw_extras(static, Features(sinks=True), torch.Generator().manual_seed(1))
    out = torch.full_like(static.q, NAN)

    def call():
        return unified_attention(*static.kernel_args(out), None, extras.sinks, return_lse=True, config=config)

    stream = torch.cuda.Stream()  # warm up (compile) off the capture, as torch.cuda.graphs advises
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = call()
    features = Features(sinks=True)
    for batch in batches + batches[:1]:  # the first round again after the others
        loaded = load_into(static, batch)
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        what = f"replay of {batch.cu_seqlens_q.diff().tolist()} / {batch.seqused_k.tolist()}"
        check_untouched_and_finite(loaded, out, lse, what)
        ref, ref_lse = reference(loaded, features, extras, dtype=torch.float32)
        n = loaded.num_valid_tokens
        check_close(out[:n], ref[:n], lse[:, :n], ref_lse[:, :n], static.q.dtype, what=what)


# --- write_kv_cache ---


@pytest.mark.parametrize(("src_dtype", "slot_dtype"), [(BF16, torch.int64), (FP16, torch.int32),
                                                       (torch.float32, torch.int64)])
def test_write_kv_cache_fp8_matches_torch(src_dtype, slot_dtype):
    """The fp8 cache holds torch's (x / scale).clamp(-448, 448).to(float8_e4m3fn), slot by slot, padding
    slots untouched. Compiled Triton divides by the scale approximately (as x * (1 / scale)), so a value
    within a few float32 ulps of the midpoint between two fp8 numbers may round to the other one: those, and
    only those, may differ from torch by one fp8 step."""
    g = torch.Generator().manual_seed(30)
    num_tokens, hkv, d, page, num_blocks = 3000, 8, 128, 16, 256
    key = (3 * torch.randn(num_tokens, hkv, d, generator=g)).to(src_dtype).cuda()
    value = torch.randn(num_tokens, hkv, d, generator=g).to(src_dtype).cuda()
    slots = torch.randperm(num_blocks * page, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.1] = -1
    slots = slots.to(slot_dtype).cuda()
    k_scale = (key.float().abs().max() / 600).reshape(1)  # the largest keys saturate
    v_scale = (value.float().abs().max() / 200).reshape(1)
    k_cache = torch.full((num_blocks, page, hkv, d), NAN, device="cuda").to(FP8)
    v_cache = torch.full((num_blocks, page, hkv, d), NAN, device="cuda").to(FP8)
    write_kv_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    keep = slots >= 0
    for cache, x, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        flat = cache.view(-1, hkv, d)
        untouched = torch.ones(flat.shape[0], dtype=torch.bool, device="cuda")
        untouched[slots[keep].long()] = False
        assert torch.isnan(flat[untouched].float()).all(), "a slot no token maps to was written"
        y = (x[keep].float() / scale).clamp(-448, 448)
        got, want = flat[slots[keep].long()].float(), y.to(FP8).float()
        differ = got != want
        midpoint = (got + want) / 2
        near_tie = (y - midpoint).abs() <= 4e-7 * y.abs()
        one_step = (got - want).abs() <= (want.abs() / 8).clamp(min=2.0**-9)  # e4m3: 3 mantissa bits
        assert (near_tie & one_step)[differ].all(), \
            f"{int(differ.sum())} values differ from torch's, not all by one step at a rounding tie"
        assert differ.float().mean() < 1e-2


def test_write_kv_cache_then_attend_fp8():
    """A batch's keys/values written into an fp8 cache by write_kv_cache, then attended over: matches the
    reference on the dequantized cache tightly and the one on the unquantized keys/values loosely (fp8 e4m3
    costs about 4% here)."""
    exact = make([(1, 2000), (300, 1200), (4, 700), (1, 1)], pad=4)
    hkv, d, page = 8, 128, 16
    table, used = exact.block_table, exact.seqused_k.tolist()
    slots, keys, values = [], [], []
    for i, ctx in enumerate(used):
        pos = torch.arange(ctx, device="cuda")
        slot = table[i].long()[pos // page] * page + pos % page
        slots.append(slot)
        keys.append(exact.k_cache.view(-1, hkv, d)[slot])
        values.append(exact.v_cache.view(-1, hkv, d)[slot])
    key, value, slot = torch.cat(keys), torch.cat(values), torch.cat(slots)
    k_scale = (key.float().abs().max() / 300).reshape(1)
    v_scale = (value.float().abs().max() / 300).reshape(1)
    quant = make([(1, 2000), (300, 1200), (4, 700), (1, 1)], pad=4)  # same shapes; cache overwritten below
    quant.q.copy_(exact.q)
    quant.block_table.copy_(table)
    quant.k_cache = torch.full(exact.k_cache.shape, NAN, device="cuda").to(FP8)
    quant.v_cache = torch.full(exact.v_cache.shape, NAN, device="cuda").to(FP8)
    quant.k_scale, quant.v_scale = k_scale, v_scale
    write_kv_cache(key, value, quant.k_cache, quant.v_cache, slot.int(), k_scale, v_scale)
    out, _ = run(quant, [0, (1, 0, 50), (1, 250, 300), 2, 3])
    ref_exact, _ = reference(exact)
    n = exact.num_valid_tokens
    assert rel_err(out[:n], ref_exact[:n]) < 0.06


# --- arguments on different devices ---


@pytest.mark.parametrize("name", ["k", "v", "out", "cu_seqlens_q", "seqused_k", "block_table"])
def test_device_mismatch(name):
    batch = make([(3, 20), (1, 7)], hq=4, hkv=2, d=64)
    names = ["q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale",
             "causal", "window_size", "block_table", "softcap", "q_descale", "k_descale", "v_descale"]
    args = dict(zip(names, batch.kernel_args(torch.full_like(batch.q, NAN)), strict=True))
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=rf"^{name} is on cpu but q is on cuda"):
        unified_attention(**args)


@pytest.mark.parametrize("name", ["alibi_slopes", "sinks"])
def test_device_mismatch_per_head_tensors(name):
    batch = make([(3, 20)], hq=4, hkv=2, d=64)
    with pytest.raises(ValueError, match=rf"^{name} must be a tensor of shape \(4,\) on cuda"):
        unified_attention(*batch.kernel_args(torch.full_like(batch.q, NAN)), **{name: torch.ones(4)})
