"""Decode batches padded to a CUDA-graph bucket compute what the unpadded batch computes (CPU: the padding
invariant through the Triton interpreter; capture and replay are checked on a GPU in test_cuda_graphs_gpu.py)."""

import pytest
import torch

from tritium.engine.cuda_graphs import DecodeInputs, batch_buckets, fill_rows
from tritium.models.attention import AttentionMetadata
from tritium.models.config import ModelConfig
from tritium.models.loader import random_model


@pytest.mark.parametrize(("max_seqs", "expected"), [
    (1, [1]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]), (12, [1, 2, 4, 8, 12]),
    (256, [1, 2, 4, *range(8, 257, 8)]),
])
def test_buckets_cover_every_batch_size(max_seqs, expected):
    assert batch_buckets(max_seqs) == expected


def test_fill_rows_writes_each_row_and_leaves_the_rest():
    table = torch.full((3, 5), -7, dtype=torch.int32)
    fill_rows(table, [[1, 2], [3, 4, 5, 6, 7], []])
    assert table.tolist() == [[1, 2, -7, -7, -7], [3, 4, 5, 6, 7], [-7] * 5]


def tiny_config() -> ModelConfig:
    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False})


@torch.inference_mode()
def test_padded_decode_batch_equals_the_unpadded_one(gen):
    cfg = tiny_config()
    model = random_model(cfg, torch.float32, "cpu", seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    page_size, num_pages = 4, 24
    caches = [tuple(torch.randn(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, generator=gen) for _ in "kv")
              for _ in range(cfg.num_layers)]
    # Three decodes with different contexts (the new token included) on scattered pages.
    context_lens = [5, 17, 9]
    pages = torch.randperm(num_pages, generator=gen).tolist()
    tables = [pages[0:2], pages[2:7], pages[7:10]]
    ids = torch.randint(0, cfg.vocab_size, (3,), generator=gen).tolist()
    positions = [n - 1 for n in context_lens]
    slots = [t[p // page_size] * page_size + p % page_size for t, p in zip(tables, positions, strict=True)]

    eager_caches = [tuple(c.clone() for c in layer) for layer in caches]
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(4, dtype=torch.int32), seqused_k=torch.tensor(context_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (5 - len(t)) for t in tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_seqlen_q=1, max_seqlen_k=max(context_lens), backend="triton")
    expected = model(torch.tensor(ids), torch.tensor(positions), meta, eager_caches)

    inputs = DecodeInputs(max_seqs=8, max_pages_per_seq=8, page_size=page_size, device=torch.device("cpu"))
    inputs.block_table.random_(0, num_pages, generator=gen)  # stale entries from "earlier steps"
    inputs.fill(8, ids, positions, slots, context_lens, tables)
    padded_caches = [tuple(c.clone() for c in layer) for layer in caches]
    got = inputs.forward(model, padded_caches, 8)

    assert got.shape == (8, cfg.hidden_size)
    err = (got[:3] - expected).norm() / expected.norm()
    assert err < 1e-5, err
    # The padding wrote nothing: outside the new tokens' slots both caches still hold the same values, in them the
    # same K/V (to rounding: the projections ran with 8 rows instead of 3).
    written = torch.zeros(num_pages * page_size, dtype=torch.bool)
    written[slots] = True
    for eager_layer, padded_layer in zip(eager_caches, padded_caches, strict=True):
        for c0, c1 in zip(eager_layer, padded_layer, strict=True):
            c0, c1 = c0.flatten(0, 1), c1.flatten(0, 1)
            assert torch.equal(c0[~written], c1[~written])
            torch.testing.assert_close(c0[written], c1[written], rtol=1e-5, atol=1e-5)
