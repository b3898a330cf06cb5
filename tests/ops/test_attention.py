"""Correctness of `unified_attention` on the CPU (Triton interpreter), small shapes, against the float64 judge.

Every batch comes from `random_paged_batch`: pages shuffled through the pool, NaN in every unused cache slot
(so reading past a context poisons the output) and padding query rows past cu_seqlens_q[-1]. Every run
writes into an output poisoned with NaN; `check` demands finite valid rows within the dtype's bound, NaN
padding rows and a matching log-sum-exp.
"""

import pytest
import torch
import triton.language as tl

from tests.ops.helpers import (
    NAN,
    PLAIN,
    Features,
    attend,
    attend_and_check,
    check,
    check_sampled,
    draw_extras,
    load_into,
    nan_page,
    poison_unused_table_entries,
    reference,
    rel_err,
    static_like,
    sub_batch,
)
from tritium.ops import AttentionConfig, unified_attention
from tritium.ops.attention import kernel
from tritium.ops.attention.batches import random_paged_batch

FP8 = torch.float8_e4m3fn

# (query_len, context_len) per sequence; context counts the new tokens.
DECODE = [(1, 1), (1, 17), (1, 64), (1, 100), (1, 33)]
PREFILL = [(37, 37), (16, 16), (1, 1), (50, 50)]
CHUNKED = [(20, 70), (13, 45), (31, 32), (16, 96)]
SPEC = [(2, 40), (3, 33), (4, 81), (5, 5), (5, 64)]
ZERO_LEN = [(0, 10), (5, 30), (0, 1), (1, 9), (0, 0), (7, 7), (0, 64)]
CONTEXT_ONE = [(1, 1), (1, 1), (1, 1)]
# Every kind at once: decode, zero-length, spec, prefill, chunk, context 1, spec ending on a page edge.
MIXED = [(1, 40), (0, 7), (5, 37), (20, 20), (13, 61), (1, 1), (3, 48)]

BATCHES = {"decode": DECODE, "prefill": PREFILL, "chunked": CHUNKED, "spec": SPEC, "zero_len": ZERO_LEN,
           "context_one": CONTEXT_ONE, "mixed": MIXED}


def batch_of(seqs, gen, hq=8, hkv=2, d=32, page=16, dtype=torch.float32, kv_dtype=None, pad=3):
    """A random paged batch whose unused block-table entries point at a page of NaN."""
    return poison_unused_table_entries(random_paged_batch(
        seqs, hq, hkv, d, page, dtype=dtype, kv_dtype=kv_dtype, pad_tokens=pad, generator=gen))


# --- batch kinds, dtypes ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_batch_kinds(kind, dtype, gen):
    attend_and_check(batch_of(BATCHES[kind], gen, dtype=dtype), gen=gen)


# --- GQA, head sizes, pages against tiles, block_m ---


@pytest.mark.parametrize(("hq", "hkv", "dtype"), [
    (3, 3, torch.float32),  # MHA, odd head count
    (4, 2, torch.float16),
    (8, 2, torch.float32),
    (10, 2, torch.float16),  # group 5
    (12, 2, torch.float32),  # group 6
    (14, 2, torch.float16),  # group 7
    (16, 2, torch.float32),  # group 8
    (32, 2, torch.float16),  # group 16
    (6, 1, torch.float32),  # MQA
    (8, 1, torch.float16),  # MQA
], ids=lambda v: str(v).replace("torch.", ""))
def test_gqa(hq, hkv, dtype, gen):
    attend_and_check(batch_of(MIXED, gen, hq=hq, hkv=hkv, dtype=dtype), gen=gen)


@pytest.mark.parametrize(("hq", "hkv", "block_m"), [
    (2, 2, 16), (2, 2, 32), (2, 2, 64),
    (10, 2, 16), (10, 2, 32), (10, 2, 64),  # group 5: 3, 6, 12 tokens per tile and padding rows
    (6, 1, 16), (6, 1, 64),  # group 6
    (14, 2, 16), (14, 2, 32),  # group 7
    (16, 1, 16), (16, 1, 64),  # group 16: one token per 16-row tile
    (2, 1, 128), (16, 2, 128),  # the GPU's prefill tile
])
def test_block_m(hq, hkv, block_m, gen):
    batch = batch_of(MIXED, gen, hq=hq, hkv=hkv)
    attend_and_check(batch, gen=gen, config=AttentionConfig(block_m, 16))


@pytest.mark.parametrize("d", [16, 48, 64, 80, 96, 112, 128])
def test_head_size(d, gen):
    batch = batch_of(MIXED, gen, hq=4, hkv=2, d=d, dtype=torch.float16)
    attend_and_check(batch, Features(sinks=d % 32 == 16, alibi=d == 80), gen=gen)


@pytest.mark.parametrize("d", [192, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_head_size(d, dtype, gen):
    batch = batch_of([(1, 20), (3, 9), (4, 4)], gen, hq=2, hkv=1, d=d, dtype=dtype)
    attend_and_check(batch, gen=gen)


@pytest.mark.parametrize(("page", "tile_k", "block_m"), [
    (8, 16, 16), (8, 32, 32),  # tiles span several pages
    (16, 16, 16), (16, 64, 32),
    (32, 16, 16), (32, 32, 64), (32, 64, 16),
    (64, 16, 32), (64, 128, 16),
    (128, 32, 16), (128, 128, 32),
    (256, 16, 16), (256, 64, 32),  # one page holds every context
    (24, 16, 16), (48, 32, 32), (80, 64, 16),  # pages neither a multiple nor a divisor of the tile
])
@pytest.mark.parametrize("lookahead", [0, 1], ids=["pages_in_step", "pages_ahead"])
def test_page_vs_tile(page, tile_k, block_m, lookahead, gen):
    """Tiles inside one page, tiles of whole pages, and pages unrelated to the tile (a key-by-key lookup),
    with block-table entries read in the step or one step ahead (which then reads past the last tile).
    Contexts end mid-page and mid-tile for every page size; one spans many small pages."""
    seqs = [(1, 67), (4, 131), (0, 3), (19, 19), (9, 41), (1, 1)]
    batch = batch_of(seqs, gen, page=page)
    attend_and_check(batch, gen=gen, config=AttentionConfig(block_m, tile_k, page_lookahead=lookahead))


# --- K/V through tensor descriptors (config.tma) ---


@pytest.fixture
def descriptors(monkeypatch):
    """The tensor descriptors launches build: (block shape) per K/V descriptor."""
    built = []

    class Recorded(kernel.TensorDescriptor):
        def __init__(self, base, shape, strides, block_shape, *args, **kwargs):
            built.append(tuple(block_shape))
            super().__init__(base, shape, strides, block_shape, *args, **kwargs)

    monkeypatch.setattr(kernel, "TensorDescriptor", Recorded)
    return built


@pytest.mark.parametrize(("page", "tile_k", "block_m", "splits", "lookahead"), [
    (16, 16, 16, 1, 0), (32, 16, 32, 1, 1), (32, 32, 16, 3, 0), (64, 32, 64, 1, 1), (64, 64, 16, 2, 1),
    (128, 64, 128, 1, 1),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tma_tiles(page, tile_k, block_m, splits, lookahead, dtype, gen, descriptors):
    """Tiles fetched through descriptors: contexts end mid-tile and mid-page (the rest of the page is NaN),
    stale block-table entries point at NaN pages, splits and the lookahead as with pointer loads."""
    seqs = [(1, 67), (4, 131), (0, 3), (19, 19), (9, 41), (1, 1), (40, 200)]
    batch = batch_of(seqs, gen, page=page, dtype=dtype)
    config = AttentionConfig(block_m, tile_k, splits, page_lookahead=lookahead, tma=1)
    attend_and_check(batch, gen=gen, config=config)
    assert descriptors == [(tile_k, 32), (tile_k, 32)], "the launch did not take the descriptor path"


@pytest.mark.parametrize("name", ["causal_all", "noncausal_all", "window_left_right0", "sinks"])
def test_tma_features(name, gen, descriptors):
    batch = batch_of([(1, 40), (0, 7), (5, 37), (12, 12), (9, 61), (1, 1), (3, 48), (2, 25)], gen, page=32)
    attend_and_check(batch, FEATURES[name], gen=gen, config=AttentionConfig(32, 16, tma=1))
    assert len(descriptors) == 2


@pytest.mark.parametrize("case", ["tile_spans_pages", "head_size_80", "strided_cache"])
def test_tma_falls_back_to_pointer_loads(case, gen, descriptors):
    """Where a descriptor cannot fetch the tile, tma=1 takes the pointer loads, with the same answer."""
    hq, hkv, d, page, dtype = 4, 2, 32, 16, torch.float32
    if case == "head_size_80":
        d = 80
    batch = batch_of(MIXED, gen, hq=hq, hkv=hkv, d=d, page=page, dtype=dtype)
    if case == "strided_cache":  # K and V as halves of one [blocks, page, 2, heads, d] buffer
        kv = torch.stack([batch.k_cache, batch.v_cache], dim=2)
        batch = type(batch)(**{**batch.__dict__, "k_cache": kv[:, :, 0], "v_cache": kv[:, :, 1]})
    tile_k = 32 if case == "tile_spans_pages" else 16
    attend_and_check(batch, gen=gen, config=AttentionConfig(16, tile_k, tma=1))
    assert descriptors == []


def test_tma_off_uses_pointer_loads(gen, descriptors):
    attend_and_check(batch_of(MIXED, gen, page=32), gen=gen, config=AttentionConfig(16, 16, tma=0))
    assert descriptors == []


# --- features, alone and together ---

FEATURES = {
    "noncausal": Features(causal=False),
    "window_left": Features(window=(9, -1)),
    "window_left_right0": Features(window=(9, 0)),
    "window_0": Features(window=(0, 0), causal=False),
    "window_left_right_noncausal": Features(window=(5, 3), causal=False),
    "window_right_noncausal": Features(window=(-1, 4), causal=False),
    "window_wide_noncausal": Features(window=(500, 500), causal=False),
    "window_right_causal": Features(window=(-1, 6)),  # the right edge is past the diagonal: no effect
    "softcap": Features(softcap=4.0, scale=0.6),  # scores large enough for the cap to bite
    "alibi": Features(alibi=True),
    "sinks": Features(sinks=True),
    "scale": Features(scale=0.05),
    "causal_all": Features(window=(13, -1), softcap=6.0, alibi=True, sinks=True, scale=0.4),
    "noncausal_all": Features(causal=False, window=(6, 2), softcap=3.0, alibi=True, sinks=True),
    "noncausal_alibi_sinks": Features(causal=False, alibi=True, sinks=True),
}

CONFIGS = {
    "default": (torch.float32, None),
    "fp16_split3": (torch.float16, AttentionConfig(32, 16, num_splits=3)),
    "fp32_tile32_m64": (torch.float32, AttentionConfig(64, 32)),
    "fp16_split2_pages_ahead": (torch.float16, AttentionConfig(32, 16, num_splits=2, page_lookahead=1)),
}


@pytest.mark.parametrize("setup", list(CONFIGS))
@pytest.mark.parametrize("name", list(FEATURES))
def test_features(name, setup, gen):
    dtype, config = CONFIGS[setup]
    seqs = [(1, 40), (0, 7), (5, 37), (12, 12), (9, 61), (1, 1), (3, 48), (2, 25)]
    batch = batch_of(seqs, gen, hq=6, hkv=2, d=48, page=8, dtype=dtype)
    attend_and_check(batch, FEATURES[name], gen=gen, config=config)


@pytest.mark.parametrize("kind", ["decode", "prefill", "chunked", "spec"])
def test_features_all_kinds(kind, gen):
    """Everything on, non-causal with a two-sided window, on each batch kind alone."""
    batch = batch_of(BATCHES[kind], gen, hq=4, hkv=1, d=64)
    attend_and_check(batch, FEATURES["noncausal_all"], gen=gen)
    attend_and_check(batch, FEATURES["causal_all"], gen=gen)


@pytest.mark.parametrize("window", [(0, -1), (1, 0), (15, 0), (16, -1), (17, -1), (31, 0), (40, -1)])
@pytest.mark.parametrize("tile_k", [16, 32])
def test_window_edges(window, tile_k, gen):
    """Window edges on, just before and just after tile boundaries; long prefills cross many tiles."""
    batch = batch_of([(70, 70), (33, 90), (1, 100), (4, 64)], gen, hq=2, hkv=1, d=16)
    attend_and_check(batch, Features(window=window), gen=gen, config=AttentionConfig(16, tile_k))


# --- fp8 cache ---


@pytest.mark.parametrize(("qdtype", "features", "config"), [
    (torch.float16, PLAIN, None),
    (torch.float32, PLAIN, None),
    (torch.float16, FEATURES["causal_all"], None),
    (torch.float16, FEATURES["noncausal_all"], AttentionConfig(16, 32, num_splits=2)),
    (torch.float32, FEATURES["causal_all"], AttentionConfig(32, 16, num_splits=5)),
    (torch.float16, Features(softcap=5.0, scale=0.5), AttentionConfig(64, 64)),
    (torch.bfloat16, PLAIN, None),
    (torch.bfloat16, FEATURES["causal_all"], AttentionConfig(16, 32, num_splits=2)),
], ids=["fp16", "fp32", "fp16_all", "fp16_noncausal_all_split2", "fp32_all_split5", "fp16_softcap_m64", "bf16",
        "bf16_all_split2"])
def test_fp8_cache(qdtype, features, config, gen):
    batch = batch_of(MIXED, gen, hq=10, hkv=2, d=80, dtype=qdtype, kv_dtype=FP8)
    assert batch.k_cache.dtype == FP8 and batch.k_scale is not None
    # Scales far from 1, so that a missing or doubled scale shows.
    assert not 0.5 < batch.k_scale.item() < 2 and not 0.5 < batch.v_scale.item() < 2
    attend_and_check(batch, features, gen=gen, config=config)


def test_bf16_query_over_fp8_pages_is_clamped_to_float16(gen, plans):
    """A bfloat16 query over fp8 pages runs float16 dots; entries past float16's range saturate instead of turning
    the scores into inf and the output into NaN."""
    batch = batch_of(MIXED, gen, hq=4, hkv=2, d=32, dtype=torch.bfloat16, kv_dtype=FP8)
    batch.q[::3, :, ::5] = 1e6
    out, _ = attend(batch)
    assert torch.isfinite(out[: batch.num_valid_tokens]).all()
    assert all(p.constexprs["Q_CLAMP"] and p.constexprs["DOT_DTYPE"] == tl.float16 for p in plans)


def test_fp8_scales_are_applied(gen):
    """The same fp8 bits with other scales give the other dequantized answer (K scale through the softmax,
    V scale linearly)."""
    batch = batch_of(MIXED, gen, hq=4, hkv=2, d=32, dtype=torch.float16, kv_dtype=FP8)
    batch.k_scale = batch.k_scale * 3.0
    batch.v_scale = batch.v_scale * 0.25
    attend_and_check(batch, gen=gen)


def test_descales_ignored_for_unquantized_cache(gen):
    """vLLM passes k/v descales (usually 1.0) with any cache; only an fp8 cache uses them."""
    batch = batch_of(MIXED, gen)
    ref, ref_lse = reference(batch)
    batch.k_scale = torch.tensor([3.0])
    batch.v_scale = torch.tensor([0.5])
    out, lse = attend(batch)
    check(batch, out, ref, lse, ref_lse)


# --- key splits ---


@pytest.mark.parametrize(("kind", "features", "splits"), [
    ("decode", PLAIN, (1, 2, 3, 5, 16)),  # 16: more splits than key tiles, so some splits are empty
    ("decode", Features(sinks=True, alibi=True), (1, 3, 16)),
    ("spec", Features(window=(10, -1), sinks=True), (1, 2, 5)),
    ("mixed", Features(causal=False, window=(7, 3), softcap=5.0, sinks=True), (1, 2, 3)),
])
def test_splits_agree(kind, features, splits, gen):
    """Key splits give one answer, each the reference's."""
    batch = batch_of(BATCHES[kind], gen, hq=4, hkv=2, d=32)
    extras = draw_extras(batch, features, gen)
    outs = []
    for num_splits in splits:
        out, lse = attend_and_check(batch, features, extras=extras, config=AttentionConfig(16, 16, num_splits))
        outs.append((out, lse))
    n = batch.num_valid_tokens
    for out, lse in outs[1:]:
        assert rel_err(out[:n], outs[0][0][:n]) < 2e-6
        torch.testing.assert_close(lse[:, :n], outs[0][1][:, :n], rtol=1e-5, atol=1e-5)


@pytest.fixture
def launched_configs(monkeypatch) -> list[AttentionConfig]:
    """The configuration of every kernel launch (its plan's) during the test."""
    seen = []
    launch = kernel.launch

    def spy(plan, **kwargs):
        seen.append(plan.config)
        return launch(plan, **kwargs)

    monkeypatch.setattr(kernel, "launch", spy)
    return seen


def test_default_config_splits_decode(gen, launched_configs):
    """On the CPU the default configuration splits a small decode batch; check that path as chosen."""
    batch = batch_of(DECODE, gen, hq=4, hkv=1, pad=0)
    attend_and_check(batch, Features(sinks=True), gen=gen)
    assert len(launched_configs) == 1 and isinstance(launched_configs[0], AttentionConfig)
    assert launched_configs[0].num_splits > 1


# --- return values, empty batches ---


def test_return_lse_false_returns_out(gen):
    batch = batch_of(MIXED, gen)
    out = torch.full_like(batch.q, NAN)
    result = unified_attention(*batch.kernel_args(out))
    assert result is out
    ref, _ = reference(batch)
    check(batch, out, ref)


def test_no_tokens():
    batch = random_paged_batch([(0, 5)], 4, 2, 32, 16, dtype=torch.float32)
    out = torch.empty_like(batch.q)
    assert out.shape[0] == 0
    result, lse = unified_attention(*batch.kernel_args(out), return_lse=True)
    assert result is out and lse.shape == (4, 0)


def test_only_empty_sequences_leave_padding_untouched(gen):
    batch = batch_of([(0, 5), (0, 1), (0, 0)], gen, pad=6)
    out = torch.full_like(batch.q, NAN)
    unified_attention(*batch.kernel_args(out))
    assert torch.isnan(out).all()


def test_large_logits(gen):
    """Scores in the hundreds: the running max must rescale, exp must never overflow."""
    batch = batch_of(MIXED, gen, hq=4, hkv=2, d=64)
    batch.q *= 25.0
    attend_and_check(batch, gen=gen)
    attend_and_check(batch, Features(sinks=True), gen=gen, config=AttentionConfig(16, 16, 3))


# --- static launch grid: new sequence lengths in the same tensors (the CPU analogue of graph replay) ---


@pytest.mark.parametrize("config", [None, AttentionConfig(16, 16, num_splits=4), AttentionConfig(32, 32)],
                         ids=["default", "split4", "m32_k32"])
def test_static_grid(config, gen, launched_configs):
    """One shape (num_tokens 24, num_seqs 4), one config, different lengths each time, same tensors; the
    default configuration (config None) must be the same choice every time."""
    rounds = [
        [(1, 50), (1, 20), (1, 7), (1, 90)],  # decodes, 20 padding tokens
        [(10, 30), (5, 5), (0, 12), (9, 100)],  # prefill chunk, prefill, empty, chunk: no padding
        [(3, 3), (2, 60), (1, 1), (17, 17)],  # 1 padding token
        [(0, 0), (0, 0), (0, 0), (0, 0)],  # nothing to do: everything padding
        [(4, 61), (4, 9), (4, 4), (4, 128)],  # speculative, 8 padding tokens
    ]
    num_tokens, num_pages, max_pages = 24, 40, 8
    batches = [batch_of(seqs, gen, hq=4, hkv=2, pad=num_tokens - sum(q for q, _ in seqs)) for seqs in rounds]
    static = static_like(batches[0], num_pages, max_pages)
    out = torch.empty_like(static.q)
    for batch in batches:
        loaded = load_into(static, batch)
        out.fill_(NAN)
        attend(static, config=config, out=out)
        ref, ref_lse = reference(loaded)
        check(loaded, out, ref, what=str(batch.seqused_k.tolist()))
    assert len(set(launched_configs)) == 1, f"the configuration changed with the sequence lengths: {launched_configs}"


# --- layouts: strided views as vLLM passes them ---


def test_strided_views(gen):
    """q and out as views of wider buffers (vLLM's qkv split), K and V as the two halves of one
    [2, blocks, page, heads, d] cache, stored head-major (a permuted view), and a block table with extra
    rows and columns."""
    seqs = MIXED
    batch = batch_of(seqs, gen, hq=6, hkv=2, d=32, page=16)
    n_tok, hq, d = batch.q.shape
    qkv = torch.randn(n_tok, hq + 4, d + 16, generator=gen)
    qkv[:, :hq, 8: 8 + d] = batch.q
    q = qkv[:, :hq, 8: 8 + d]
    out_buf = torch.full((n_tok, hq + 1, d + 32), NAN)
    out = out_buf[:, 1:, :d]
    blocks, page, hkv, _ = batch.k_cache.shape
    kv = torch.full((2, blocks, hkv, page, d), NAN)  # head-major storage
    kv[0] = batch.k_cache.permute(0, 2, 1, 3)
    kv[1] = batch.v_cache.permute(0, 2, 1, 3)
    k, v = kv.permute(0, 1, 3, 2, 4).unbind(0)
    assert not k.is_contiguous() and k.stride(-1) == 1
    table = torch.full((len(seqs) + 3, batch.block_table.shape[1] + 5), nan_page(batch), dtype=torch.int32)
    table[: len(seqs), : batch.block_table.shape[1]] = batch.block_table
    strided = type(batch)(**{**batch.__dict__, "q": q, "k_cache": k, "v_cache": v, "block_table": table})
    result = unified_attention(*strided.kernel_args(out), return_lse=True)[0]
    assert result is out
    ref, _ = reference(batch)
    check(batch, out, ref)
    assert torch.isnan(out_buf[:, 0]).all() and torch.isnan(out_buf[:, :, 1 + d:]).all(), "wrote outside `out`"


# --- the test helpers themselves ---


def test_sub_batch_matches_full_reference(gen):
    """`sub_batch` (used by the GPU tests to judge a sample of rows) gives the full batch's rows."""
    batch = batch_of(MIXED, gen, kv_dtype=FP8)
    for features in (Features(window=(9, -1), sinks=True), Features(causal=False, alibi=True)):
        extras = draw_extras(batch, features, gen)
        ref, ref_lse = reference(batch, features, extras)
        picks = [[0], [2, 4], [6, 1, 3], [(4, 3, 13), 0, (3, 0, 7)], [(4, 0, 1), (2, 4, 5)]]
        for pick in picks:
            if not features.causal and any(isinstance(p, tuple) and p[2] < BATCHES["mixed"][p[0]][0]
                                           for p in pick):
                continue
            sub, rows = sub_batch(batch, pick, causal=features.causal)
            sub_ref, sub_lse = reference(sub, features, extras)
            torch.testing.assert_close(sub_ref, ref[rows])
            torch.testing.assert_close(sub_lse, ref_lse[:, rows])
        out, lse = attend(batch, features, extras)
        check_sampled(batch, out, lse, [(4, 3, 13), 2] if features.causal else [(4, 5, 13), 2], features, extras)


# --- argument errors ---


def _valid_call(gen, dtype=torch.float32, kv_dtype=None, hq=4, hkv=2, d=32):
    batch = random_paged_batch([(3, 20), (1, 7)], hq, hkv, d, 16, dtype=dtype, kv_dtype=kv_dtype,
                               pad_tokens=1, generator=gen)
    out = torch.full_like(batch.q, NAN)
    names = ["q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale",
             "causal", "window_size", "block_table", "softcap", "q_descale", "k_descale", "v_descale"]
    return dict(zip(names, batch.kernel_args(out), strict=True))


def _meta(t):
    return t.to("meta")


def _strided_last(t):
    """The same values, not contiguous in the last dimension."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


ERRORS = {
    # name: (change to a valid call, pattern the message must match)
    "q_not_tensor": (lambda a: {"q": a["q"].tolist()}, r"^q must be a torch.Tensor"),
    "block_table_none": (lambda a: {"block_table": None}, r"^block_table must be a torch.Tensor"),
    "k_other_device": (lambda a: {"k": _meta(a["k"])}, r"^k is on meta"),
    "cu_seqlens_other_device": (lambda a: {"cu_seqlens_q": _meta(a["cu_seqlens_q"])}, r"^cu_seqlens_q is on meta"),
    "q_float64": (lambda a: {"q": a["q"].double(), "out": a["out"].double()}, r"^q has dtype"),
    "q_int": (lambda a: {"q": a["q"].int(), "out": a["out"].int()}, r"^q has dtype"),
    "q_fp8_without_descale": (lambda a: {"q": a["q"].to(FP8)}, r"^q_descale must be a float32 tensor .*fp8 query"),
    "q_float8_e5m2": (lambda a: {"q": a["q"].to(torch.float8_e5m2)}, r"^q has dtype"),
    "q_2d": (lambda a: {"q": a["q"].flatten(1), "out": a["out"].flatten(1)}, r"^q must be \[num_tokens"),
    "q_4d": (lambda a: {"q": a["q"][None], "out": a["out"][None]}, r"^q must be \[num_tokens"),
    "out_shape": (lambda a: {"out": a["out"][:-1]}, r"^out must match q"),
    "out_dtype": (lambda a: {"out": a["out"].half()}, r"^out must match q"),
    "k_float16_with_float32_q": (lambda a: {"k": a["k"].half(), "v": a["v"].half()}, r"^k has dtype"),
    "v_float16_with_float32_q": (lambda a: {"v": a["v"].half()}, r"^v has dtype"),
    "k_3d": (lambda a: {"k": a["k"][0], "v": a["v"][0]}, r"^k must be \[num_pages"),
    "v_3d": (lambda a: {"v": a["v"][0]}, r"^v must be \[num_pages"),
    "kv_shape_mismatch": (lambda a: {"v": a["v"][:-1]}, r"^k and v must agree"),
    "kv_dtype_mismatch": (lambda a: {"k": a["k"].to(FP8), "k_descale": torch.ones(1), "v_descale": torch.ones(1)},
                          r"^k and v must agree"),
    "kv_head_size": (lambda a: {"k": a["k"][..., :16], "v": a["v"][..., :16]}, r"^k has head size 16"),
    "q_not_contiguous": (lambda a: {"q": _strided_last(a["q"])}, r"^q must be contiguous"),
    "out_not_contiguous": (lambda a: {"out": _strided_last(a["out"])}, r"^out must be contiguous"),
    "k_not_contiguous": (lambda a: {"k": _strided_last(a["k"]), "v": _strided_last(a["v"])},
                         r"^k must be contiguous"),
    "cu_seqlens_int64": (lambda a: {"cu_seqlens_q": a["cu_seqlens_q"].long()}, r"^cu_seqlens_q must be int32"),
    "seqused_k_int64": (lambda a: {"seqused_k": a["seqused_k"].long()}, r"^seqused_k must be int32"),
    "block_table_int64": (lambda a: {"block_table": a["block_table"].long()}, r"^block_table must be int32"),
    "cu_seqlens_2d": (lambda a: {"cu_seqlens_q": a["cu_seqlens_q"][None]}, r"^cu_seqlens_q must be 1-D"),
    "cu_seqlens_empty": (lambda a: {"cu_seqlens_q": a["cu_seqlens_q"][:0]}, r"^cu_seqlens_q must be 1-D"),
    "seqused_k_shape": (lambda a: {"seqused_k": a["seqused_k"][:1]}, r"^seqused_k must have shape \(2,\)"),
    "block_table_rows": (lambda a: {"block_table": a["block_table"][:1]}, r"^block_table must be \[num_seqs"),
    "block_table_1d": (lambda a: {"block_table": a["block_table"][0]}, r"^block_table must be \[num_seqs"),
    "block_table_not_contiguous": (lambda a: {"block_table": _strided_last(a["block_table"])},
                                   r"^block_table must be contiguous"),
    "block_table_too_short": (lambda a: {"max_seqlen_k": a["block_table"].shape[1] * 16 + 1},
                              r"^block_table is too short"),
    "softmax_scale_zero": (lambda a: {"softmax_scale": 0.0}, r"^softmax_scale must be positive"),
    "softmax_scale_negative": (lambda a: {"softmax_scale": -0.1}, r"^softmax_scale must be positive"),
    "softmax_scale_nan": (lambda a: {"softmax_scale": NAN}, r"^softmax_scale must be positive"),
    "softcap_negative": (lambda a: {"softcap": -1.0}, r"^softcap must be >= 0"),
    "window_below_minus_one": (lambda a: {"window_size": (-2, 0)}, r"^window_size must be"),
    "window_right_below_minus_one": (lambda a: {"window_size": (4, -3)}, r"^window_size must be"),
    "window_three": (lambda a: {"window_size": (1, 2, 3)}, r"^window_size must be"),
    "q_descale": (lambda a: {"q_descale": torch.ones(1)}, r"^q_descale goes with an fp8 query"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_argument_errors(name, gen):
    args = _valid_call(gen)
    change, pattern = ERRORS[name]
    args.update(change(args))
    with pytest.raises(ValueError, match=pattern):
        unified_attention(**args)


@pytest.mark.parametrize("d", [8, 72, 264, 24, 272])
def test_head_size_errors(d, gen):
    with pytest.raises(ValueError, match=rf"^head size {d} is not supported"):
        unified_attention(**_valid_call(gen, d=d))


@pytest.mark.parametrize(("hq", "hkv", "pattern"), [
    (6, 4, r"^num_q_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
    (4, 3, r"^num_q_heads \(4\) must be a multiple"),
    (258, 2, r"^GQA ratio 129 is above"),
])
def test_head_count_errors(hq, hkv, pattern, gen):
    with pytest.raises(ValueError, match=pattern):
        unified_attention(**_valid_call(gen, hq=hq, hkv=hkv, d=16))


FP8_ERRORS = {
    "no_k_descale": ({"k_descale": None}, r"^k_descale must be a float32 tensor"),
    "no_v_descale": ({"v_descale": None}, r"^v_descale must be a float32 tensor"),
    "float_k_descale": ({"k_descale": 0.5}, r"^k_descale must be a float32 tensor"),
    "float64_v_descale": ({"v_descale": torch.ones(1, dtype=torch.float64)}, r"^v_descale must be a float32"),
    "two_element_k_descale": ({"k_descale": torch.ones(2)}, r"^k_descale must be a float32 tensor"),
    "meta_v_descale": ({"v_descale": torch.ones(1, device="meta")}, r"^v_descale must be a float32 tensor"),
}


@pytest.mark.parametrize("name", list(FP8_ERRORS))
def test_fp8_scale_errors(name, gen):
    args = _valid_call(gen, dtype=torch.float16, kv_dtype=FP8)
    unified_attention(**args)  # valid as it is
    change, pattern = FP8_ERRORS[name]
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        unified_attention(**args)


EXTRA_ERRORS = {
    "alibi_short": ({"alibi_slopes": torch.ones(3)}, r"^alibi_slopes must be a tensor of shape \(4,\)"),
    "alibi_2d": ({"alibi_slopes": torch.ones(1, 4)}, r"^alibi_slopes must be a tensor of shape"),
    "alibi_list": ({"alibi_slopes": [1.0] * 4}, r"^alibi_slopes must be a tensor of shape"),
    "alibi_int": ({"alibi_slopes": torch.ones(4, dtype=torch.int32)}, r"^alibi_slopes must be floating point"),
    "alibi_meta": ({"alibi_slopes": torch.ones(4, device="meta")}, r"^alibi_slopes must be a tensor of shape"),
    "sinks_long": ({"sinks": torch.ones(8)}, r"^sinks must be a tensor of shape \(4,\)"),
    "sinks_per_kv_head": ({"sinks": torch.ones(2)}, r"^sinks must be a tensor of shape"),
    "sinks_strided": ({"sinks": torch.ones(8)[::2]}, r"^sinks must be contiguous"),
}


@pytest.mark.parametrize("name", list(EXTRA_ERRORS))
def test_alibi_sinks_errors(name, gen):
    args = _valid_call(gen)
    change, pattern = EXTRA_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        unified_attention(**args, **change)


@pytest.mark.parametrize(("hq", "hkv", "config", "pattern"), [
    (32, 1, AttentionConfig(16, 16), r"^config.block_m=16 is smaller than the GQA group \(32"),
    (4, 2, AttentionConfig(8, 16), r"^config.block_m must be a power of two >= 16"),
    (4, 2, AttentionConfig(48, 16), r"^config.block_m must be a power of two"),
    (4, 2, AttentionConfig(16, 24), r"^config.tile_k must be a power of two >= 16"),
    (4, 2, AttentionConfig(16, 8), r"^config.tile_k must be a power of two >= 16"),
    (4, 2, AttentionConfig(16, 16, num_splits=0), r"^config.num_splits must be in \[1, 256\]"),
    (4, 2, AttentionConfig(16, 16, num_splits=257), r"^config.num_splits must be in"),
])
def test_config_errors(hq, hkv, config, pattern, gen):
    args = _valid_call(gen, hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match=pattern):
        unified_attention(**args, config=config)
    assert torch.isnan(args["out"]).all(), "a rejected call wrote its output"


def test_errors_leave_output_untouched(gen):
    args = _valid_call(gen)
    with pytest.raises(ValueError):
        unified_attention(**{**args, "softcap": -1.0})
    assert torch.isnan(args["out"]).all()


def test_valid_call_runs(gen):
    """The base of the error tests is valid: each error comes from its one change."""
    args = _valid_call(gen)
    unified_attention(**args, alibi_slopes=torch.ones(4), sinks=torch.zeros(4))
    assert torch.isfinite(args["out"][:4]).all()
