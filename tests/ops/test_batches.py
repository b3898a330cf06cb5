"""Random paged batches (tritium/ops/attention/batches.py): their layout, the fp8 variant, and the sampled reference."""

import pytest
import torch

from tritium.ops import attention_reference
from tritium.ops.attention.batches import FP8_KV_DTYPE, random_paged_batch, reference_sample

SEQS = [(3, 20), (1, 1), (16, 16), (0, 7), (5, 37), (2, 33)]


def used_slots(batch) -> torch.Tensor:
    """A [num_pages, page_size] mask of the cache slots that hold some sequence's context."""
    num_pages, page_size = batch.k_cache.shape[:2]
    mask = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for i, ctx in enumerate(batch.seqused_k.tolist()):
        for pos in range(ctx):
            mask[batch.block_table[i, pos // page_size], pos % page_size] = True
    return mask


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("pad_tokens", [0, 3])
def test_layout(page_size, pad_tokens, gen):
    spare = 3
    batch = random_paged_batch(SEQS, 8, 2, 32, page_size, dtype=torch.float32, pad_tokens=pad_tokens,
                               spare_pages=spare, generator=gen)
    num_tokens = sum(q for q, _ in SEQS)
    assert batch.q.shape == (num_tokens + pad_tokens, 8, 32) and batch.q.dtype == torch.float32
    assert torch.isfinite(batch.q).all()
    assert batch.cu_seqlens_q.dtype == torch.int32 and batch.seqused_k.dtype == torch.int32
    assert batch.cu_seqlens_q.tolist() == [0, 3, 4, 20, 20, 25, 27]
    assert batch.num_valid_tokens == num_tokens
    assert batch.seqused_k.tolist() == [ctx for _, ctx in SEQS]
    assert batch.max_seqlen_q == 16 and batch.max_seqlen_k == 37

    pages_per_seq = [-(-ctx // page_size) for _, ctx in SEQS]
    num_pages = sum(pages_per_seq) + spare
    assert batch.k_cache.shape == batch.v_cache.shape == (num_pages, page_size, 2, 32)
    assert batch.block_table.dtype == torch.int32
    assert batch.block_table.shape == (len(SEQS), max(pages_per_seq))
    pages = [p for i, n in enumerate(pages_per_seq) for p in batch.block_table[i, :n].tolist()]
    assert len(pages) == len(set(pages)) == sum(pages_per_seq), "a page is shared between sequences"
    assert all(0 <= p < num_pages for p in pages)

    used = used_slots(batch)
    assert used.sum() == sum(ctx for _, ctx in SEQS)
    for cache in (batch.k_cache, batch.v_cache):
        assert torch.isfinite(cache[used]).all(), "a used cache slot is not finite"
        assert torch.isnan(cache[~used]).all(), "an unused cache slot is not NaN"
    assert batch.k_scale is None and batch.v_scale is None


def test_pages_are_shuffled():
    batch = random_paged_batch([(1, 64)] * 8, 4, 1, 16, 4, dtype=torch.float32)
    pages = batch.block_table.flatten().tolist()
    assert pages != sorted(pages)


def test_dtype_and_reproducibility():
    a = random_paged_batch(SEQS, 4, 2, 16, 8, dtype=torch.float16, generator=torch.Generator().manual_seed(7))
    b = random_paged_batch(SEQS, 4, 2, 16, 8, dtype=torch.float16, generator=torch.Generator().manual_seed(7))
    assert a.q.dtype == a.k_cache.dtype == a.v_cache.dtype == torch.float16
    assert torch.equal(a.q, b.q) and torch.equal(a.block_table, b.block_table)
    assert torch.equal(a.k_cache.nan_to_num(), b.k_cache.nan_to_num())


def test_fp8_cache_has_scales(gen):
    batch = random_paged_batch(SEQS, 8, 2, 32, 4, dtype=torch.float16, kv_dtype=FP8_KV_DTYPE, generator=gen)
    assert batch.q.dtype == torch.float16
    assert batch.k_cache.dtype == batch.v_cache.dtype == FP8_KV_DTYPE
    used = used_slots(batch)
    for cache, scale in ((batch.k_cache, batch.k_scale), (batch.v_cache, batch.v_scale)):
        assert scale is not None and scale.dtype == torch.float32 and scale.shape == (1,)
        assert scale.item() > 0
        values = cache.float()
        assert torch.isfinite(values[used]).all() and torch.isnan(values[~used]).all()
        # The largest value is stored at 224, half of e4m3's range.
        assert values[used].abs().max().item() == 224.0
    # Dequantized, the cache is a standard-normal sample again, not a constant.
    keys = batch.k_cache.float()[used] * batch.k_scale
    assert 0.5 < keys.std().item() < 2.0


@pytest.mark.parametrize("seqs", [[(5, 4)], [(1, 1), (2, 1)], [(-1, 3)]])
def test_invalid_sequences_raise(seqs):
    with pytest.raises(ValueError, match="query_len <= context_len"):
        random_paged_batch(seqs, 4, 1, 16, 16)


@pytest.mark.parametrize("window_size", [(-1, -1), (6, 0)])
@pytest.mark.parametrize("rows_per_seq", [1, 3, 64])
def test_reference_sample(window_size, rows_per_seq, gen):
    seqs = [(5, 12), (1, 9), (7, 7), (4, 30), (2, 2)]  # first, middle (index 2) and last sequences
    batch = random_paged_batch(seqs, 8, 2, 16, 4, dtype=torch.float32, pad_tokens=2, generator=gen)
    rows, ref = reference_sample(batch, window_size, rows_per_seq=rows_per_seq)
    expected_rows = []
    for i in (0, 2, 4):
        start, end = batch.cu_seqlens_q[i].item(), batch.cu_seqlens_q[i + 1].item()
        expected_rows += list(range(max(start, end - rows_per_seq), end))
    assert rows.tolist() == expected_rows
    assert ref.dtype == torch.float64 and ref.shape == (len(expected_rows), 8, 16)
    full, _ = attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seqused_k,
                                  batch.block_table, 16 ** -0.5, window_size=window_size)
    torch.testing.assert_close(ref, full[rows], rtol=1e-12, atol=1e-12)


def test_reference_sample_one_sequence_and_fp8(gen):
    batch = random_paged_batch([(9, 20)], 4, 4, 16, 8, dtype=torch.float16, kv_dtype=FP8_KV_DTYPE, generator=gen)
    rows, ref = reference_sample(batch, rows_per_seq=4)
    assert rows.tolist() == [5, 6, 7, 8]
    full, _ = attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seqused_k,
                                  batch.block_table, 16 ** -0.5, k_scale=batch.k_scale, v_scale=batch.v_scale)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ref, full[rows], rtol=1e-12, atol=1e-12)
