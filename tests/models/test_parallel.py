"""Tensor-parallel shards (tritium/models/parallel.py, loader.py), in one process: each rank's model, built and
loaded as that rank builds it, from a safetensors index of several files, holds what attention and the MLP need on
that rank: its query heads, the KV heads those heads read (replicated where there are fewer KV heads than ranks),
its columns of o, its slice of the MLP and of the vocabulary. The ranks' runs together are checked against one rank
in tests/engine/test_tensor_parallel.py."""

import json

import pytest
import torch

from tests.models.helpers import save_family
from tritium.distributed import group
from tritium.models.config import ModelConfig
from tritium.models.loader import load_model
from tritium.models.parallel import check_tensor_parallel

# 4 query heads, 2 KV heads, a vocabulary of 98 rows (4 ranks: 25 each, the last with 2 rows of padding).
OVERRIDES = {"vocab_size": 98}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple:
    """(folder saved in several safetensors files with an index, the whole model loaded with one rank)."""
    path = tmp_path_factory.mktemp("qwen2_sharded")
    hf = save_family("qwen2", tmp_path_factory.mktemp("qwen2"), **OVERRIDES)  # biases on q/k/v, an untied LM head
    hf.save_pretrained(path, max_shard_size="40KB")
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    return path, load_model(path, torch.float32, "cpu")


def load_rank(path, rank: int, size: int, monkeypatch) -> torch.nn.Module:
    with monkeypatch.context() as m:
        m.setattr(group, "_rank", rank)
        m.setattr(group, "_size", size)
        return load_model(path, torch.float32, "cpu")


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_its_slices(sharded, size, monkeypatch):
    path, full = sharded
    cfg = full.config
    d, group_size = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    ranks = [load_rank(path, r, size, monkeypatch) for r in range(size)]
    for i, layer in enumerate(full.model.layers):
        attn = layer.self_attn
        q_full, k_full, v_full = _split(attn.qkv_proj.weight, attn)
        qb_full, kb_full, vb_full = _split(attn.qkv_proj.bias, attn)
        for r, model in enumerate(ranks):
            mine = model.model.layers[i].self_attn
            assert mine.num_heads == cfg.num_heads // size and mine.num_kv_heads == max(1, cfg.num_kv_heads // size)
            q, k, v = _split(mine.qkv_proj.weight, mine)
            qb, kb, vb = _split(mine.qkv_proj.bias, mine)
            for j in range(mine.num_heads):
                head = r * mine.num_heads + j  # the query head's number in the whole model
                kv_mine, kv_full = j // (mine.num_heads // mine.num_kv_heads), head // group_size
                assert torch.equal(q[j], q_full[head]) and torch.equal(qb[j], qb_full[head])
                # the KV head this rank pairs the query head with is the one the whole model does
                assert torch.equal(k[kv_mine], k_full[kv_full]) and torch.equal(v[kv_mine], v_full[kv_full])
                assert torch.equal(kb[kv_mine], kb_full[kv_full]) and torch.equal(vb[kv_mine], vb_full[kv_full])
                o_cols = mine.o_proj.weight[:, j * d:(j + 1) * d]
                assert torch.equal(o_cols, attn.o_proj.weight[:, head * d:(head + 1) * d])
        mlps = [m.model.layers[i].mlp for m in ranks]
        gates, ups = zip(*(m.gate_up_proj.weight.chunk(2) for m in mlps), strict=True)
        assert torch.equal(torch.cat(gates + ups), layer.mlp.gate_up_proj.weight)
        assert torch.equal(torch.cat([m.down_proj.weight for m in mlps], dim=1), layer.mlp.down_proj.weight)
        for m in ranks:
            assert torch.equal(m.model.layers[i].input_layernorm.weight, layer.input_layernorm.weight)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.cat([m.get_parameter(name) for m in ranks])
        assert torch.equal(rows[:cfg.vocab_size], full.get_parameter(name))


def _split(t: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused q/k/v weight (or bias) as per-head q, k, v: [heads, head_dim, ...]."""
    d = attn.head_dim
    q, k, v = t.split([attn.num_heads * d, attn.num_kv_heads * d, attn.num_kv_heads * d])
    return q.unflatten(0, (-1, d)), k.unflatten(0, (-1, d)), v.unflatten(0, (-1, d))


def test_sizes_the_ranks_cannot_split_are_named():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 48, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 6, "num_key_value_heads": 2}
    check_tensor_parallel(ModelConfig.from_dict(base), 2)
    check_tensor_parallel(ModelConfig.from_dict({**base, "num_attention_heads": 4}), 4)  # each KV head on 2 ranks
    with pytest.raises(ValueError, match="num_attention_heads \\(6\\) is not divisible by tensor_parallel_size"):
        check_tensor_parallel(ModelConfig.from_dict(base), 4)
    with pytest.raises(ValueError, match="num_key_value_heads \\(2\\)"):
        check_tensor_parallel(ModelConfig.from_dict({**base, "num_attention_heads": 6}), 3)
    with pytest.raises(ValueError, match="intermediate_size \\(64\\)"):
        check_tensor_parallel(ModelConfig.from_dict({**base, "num_attention_heads": 6, "num_key_value_heads": 6}), 3)
