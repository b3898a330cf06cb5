"""The fused-MoE kernels compiled for a CUDA GPU, at the real layers' shapes (Mixtral-8x7B, Qwen3-30B-A3B), against
the experts' loop in float32; captured in a CUDA graph and replayed with other routings.

Selected with `pytest -m gpu` on a GPU machine."""

import pytest
import torch

from tests.ops.helpers import NAN, rel_err
from tritium.bench.moe import moe_shapes
from tritium.ops import fused_moe, select_experts
from tritium.ops.moe import GemmConfig, MoEConfig, choose_config, moe_reference
from tritium.ops.moe.configs import table_choice

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BOUND = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
SHAPES = moe_shapes()


@pytest.fixture(scope="module", params=list(SHAPES))
def layer(request):
    """One MoE layer's weights in bf16 and fp16, scaled so that activations stay near 1."""
    s = SHAPES[request.param]
    g = torch.Generator("cuda").manual_seed(0)
    w13 = torch.randn(s.num_experts, 2 * s.inter, s.hidden, generator=g, device="cuda") / s.hidden**0.5
    w2 = torch.randn(s.num_experts, s.hidden, s.inter, generator=g, device="cuda") / s.inter**0.5
    weights = {dtype: (w13.to(dtype), w2.to(dtype)) for dtype in BOUND}
    del w13, w2
    yield s, weights
    del weights
    torch.cuda.empty_cache()


def route(s, num_tokens: int, g: torch.Generator, experts_used: int | None = None):
    logits = torch.randn(num_tokens, s.num_experts, generator=g, device="cuda")
    if experts_used is not None:  # the others get no token
        logits[:, experts_used:] = -torch.inf
    return select_experts(logits, s.top_k, renormalize=True)


@pytest.mark.parametrize("dtype", list(BOUND), ids=["bf16", "fp16"])
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 333, 4096])
def test_matches_loop(layer, dtype, num_tokens):
    """The config the class gets (tuned or derived), from a batch of one token (most experts get none) to 4096."""
    s, weights = layer
    w13, w2 = weights[dtype]
    g = torch.Generator("cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, s.hidden, generator=g, device="cuda").to(dtype)
    topk_weights, ids = route(s, num_tokens, g)
    out = fused_moe(x, w13, w2, topk_weights, ids)
    want = moe_reference(x, w13, w2, topk_weights, ids, dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < BOUND[dtype]


@pytest.mark.parametrize("extra", [0, 1])
def test_few_experts_get_every_token(layer, extra):
    """Every token on the same top_k (+ extra) experts: long runs of rows on each, every other expert empty."""
    s, weights = layer
    w13, w2 = weights[torch.bfloat16]
    g = torch.Generator("cuda").manual_seed(extra)
    x = torch.randn(200, s.hidden, generator=g, device="cuda").to(torch.bfloat16)
    topk_weights, ids = route(s, 200, g, experts_used=s.top_k + extra)
    out = fused_moe(x, w13, w2, topk_weights, ids)
    want = moe_reference(x, w13, w2, topk_weights, ids, dtype=torch.float32)
    assert rel_err(out, want) < BOUND[torch.bfloat16]


CONFIGS = [MoEConfig(GemmConfig(16, 64, 128, 4, 4), GemmConfig(16, 32, 256, 4, 3)),
           MoEConfig(GemmConfig(64, 64, 64, 4, 3), GemmConfig(32, 128, 64, 8, 4)),
           MoEConfig(GemmConfig(128, 128, 64, 8, 3), GemmConfig(128, 256, 64, 8, 3))]


@pytest.mark.parametrize("config", CONFIGS, ids=["decode", "mid", "prefill"])
def test_configs_across_sizes(layer, config):
    s, weights = layer
    w13, w2 = weights[torch.bfloat16]
    g = torch.Generator("cuda").manual_seed(7)
    for num_tokens in (1, 37, 1000):
        x = torch.randn(num_tokens, s.hidden, generator=g, device="cuda").to(torch.bfloat16)
        topk_weights, ids = route(s, num_tokens, g)
        out = fused_moe(x, w13, w2, topk_weights, ids, config=config)
        assert rel_err(out, moe_reference(x, w13, w2, topk_weights, ids, dtype=torch.float32)) < 1.5e-2


def test_tuned_entries_run(layer):
    """Every tuned entry of this device's table (its own or a sibling's) for this shape runs and is right."""
    s, weights = layer
    w13, w2 = weights[torch.bfloat16]
    choice = table_choice(torch.device("cuda"))
    entries = {k: v for k, v in {**choice.sibling, **choice.own}.items()
               if k.startswith(f"moe-e{s.num_experts}-k{s.top_k}-h{s.hidden}-i{s.inter}-")}
    g = torch.Generator("cuda").manual_seed(1)
    for cls, fields in entries.items():
        num_tokens = int(cls.rsplit("-t", 1)[1])
        x = torch.randn(num_tokens, s.hidden, generator=g, device="cuda").to(torch.bfloat16)
        topk_weights, ids = route(s, num_tokens, g)
        out = fused_moe(x, w13, w2, topk_weights, ids, config=MoEConfig.from_dict(fields))
        err = rel_err(out, moe_reference(x, w13, w2, topk_weights, ids, dtype=torch.float32))
        assert err < 1.5e-2, (cls, err)


@pytest.mark.parametrize("num_tokens", [1, 8, 256])
def test_cuda_graph_replays_other_routings(layer, num_tokens):
    """Captured once, replayed with routings that give the experts other counts (one expert getting all tokens,
    then a spread): each replay gives an eager call's result on the same inputs. The grid depends on no count."""
    s, weights = layer
    w13, w2 = weights[torch.bfloat16]
    g = torch.Generator("cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, s.hidden, generator=g, device="cuda").to(torch.bfloat16)
    topk_weights, ids = route(s, num_tokens, g)
    config = choose_config(x.device, num_tokens, s.num_experts, s.top_k, s.hidden, s.inter)
    fused_moe(x, w13, w2, topk_weights, ids, config=config)  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, topk_weights, ids, config=config)
    for used in (s.top_k, None):
        new_weights, new_ids = route(s, num_tokens, g, experts_used=used)
        topk_weights.copy_(new_weights)
        ids.copy_(new_ids)
        x.copy_(torch.randn(num_tokens, s.hidden, generator=g, device="cuda"))
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, fused_moe(x, w13, w2, topk_weights, ids, config=config)) < 1e-5
