"""A model loaded in bfloat16: parameters in bfloat16, the rotary table kept in float32 (in bfloat16 its angles
would be off by radians a few thousand positions in), and logits close to the float32 model's."""

import torch

from tests.models.helpers import PagedBatch, save_family
from tritium.models.loader import load_model


def test_bfloat16_model_keeps_float32_rotary_table(tmp_path):
    save_family("llama3", tmp_path)
    models = {dtype: load_model(tmp_path, dtype, "cpu") for dtype in (torch.float32, torch.bfloat16)}
    model = models[torch.bfloat16]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.cos_sin_cache.dtype == torch.float32
    assert torch.equal(model.cos_sin_cache, models[torch.float32].cos_sin_cache)
    prompt = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = {}
    for dtype, m in models.items():
        batch = PagedBatch(m, 1, 32, "reference")
        batch.caches = [tuple(c.to(dtype) for c in pair) for pair in batch.caches]
        logits[dtype] = batch.step({0: prompt})[0]
    want = logits[torch.float32]
    err = ((logits[torch.bfloat16] - want).norm() / want.norm()).item()
    assert err < 3e-2, f"bfloat16 logits off by {err:.2e}"
