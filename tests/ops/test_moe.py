"""The fused-MoE kernels (through the interpreter here) against the experts' loop in float64; the counting sort
they start with; routing; bad arguments."""

import pytest
import torch

from tests.ops.helpers import NAN, rel_err
from tritium.ops import fused_moe, select_experts
from tritium.ops.moe import GemmConfig, MoEConfig, kernel, moe_reference

# ||out - ref|| / ||ref|| against float64: fp32 products; fp16 rounds x, weights, gate/up, the activation, the rows.
BOUND = {torch.float32: 1e-5, torch.float16: 3e-3}
SMALL = MoEConfig(GemmConfig(16, 32, 32), GemmConfig(16, 16, 32))


def draw(num_tokens, num_experts, top_k, hidden, inter, dtype, gen, experts_used=None):
    """x, w13, w2 (scaled so that activations stay near 1) and a routing of softmax-top-k weights, restricted to
    the first `experts_used` experts if given (the others get no token)."""
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if experts_used is not None:
        logits[:, experts_used:] = -torch.inf
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def run_kernels(x, w13, w2, weights, ids, config=SMALL):
    out = torch.full_like(x, NAN)
    kernel.launch(x, w13, w2, weights, ids, out, config)
    return out


CASES = [  # tokens, experts, top_k, hidden, inter, dtype, experts that get tokens
    (1, 8, 2, 32, 48, torch.float32, None),  # one token: six experts get none
    (13, 4, 2, 64, 80, torch.float32, None),  # several tiles per expert, inter not a multiple of the tile
    (9, 6, 3, 48, 32, torch.float16, 4),  # hidden 48: a partial reduction step; experts 4 and 5 get nothing
    (20, 16, 1, 32, 16, torch.float32, 3),  # top-1, 13 empty experts between and after
]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter", "dtype", "used"), CASES)
def test_kernels_match_float64(tokens, experts, top_k, hidden, inter, dtype, used, gen):
    x, w13, w2, weights, ids = draw(tokens, experts, top_k, hidden, inter, dtype, gen, used)
    inputs = [t.clone() for t in (x, w13, w2, weights, ids)]
    out = run_kernels(x, w13, w2, weights, ids)
    assert torch.isfinite(out).all()
    err = rel_err(out, moe_reference(x, w13, w2, weights, ids))
    assert err < BOUND[dtype], f"relative error {err:.2e}"
    assert all(torch.equal(a, b) for a, b in zip(inputs, (x, w13, w2, weights, ids))), "inputs were modified"


def test_larger_tiles_and_unrouted_slots(gen):
    """32-row tiles over 40 assignments of one expert; slots whose id is out of range (-1, num_experts)
    contribute nothing in the kernels and in the reference."""
    x, w13, w2, weights, ids = draw(24, 3, 2, 32, 64, torch.float32, gen)
    ids[3, 1], ids[7, 0], ids[8, :] = -1, 3, 5
    config = MoEConfig(GemmConfig(32, 64, 16, 4, 2), GemmConfig(32, 32, 64, 4, 2))
    out = run_kernels(x, w13, w2, weights, ids, config)
    want = moe_reference(x, w13, w2, weights, ids)
    assert torch.all(want[8] == 0) and rel_err(out, want) < BOUND[torch.float32]


def test_counting_sort(gen):
    """sorted_ids is a permutation of the routed assignments in expert order; counts are each expert's."""
    ids = torch.randint(0, 40, (300, 4), generator=gen, dtype=torch.int32)
    ids[5, 2] = -1  # unrouted: left out
    grouping = kernel.group_by_expert(ids, 40)
    flat = ids.flatten()
    routed = flat >= 0
    want_counts = torch.bincount(flat[routed], minlength=40)
    assert torch.equal(grouping.counts.long(), want_counts)
    order = grouping.sorted_ids[: int(routed.sum())].long()
    assert sorted(order.tolist()) == torch.nonzero(routed)[:, 0].tolist()
    assert torch.equal(flat[order], torch.sort(flat[routed]).values)


def test_tile_bound_holds_for_worst_routings():
    """max_m_tiles bounds the tiles of any routing: every expert that gets a row rounds up to a whole tile."""
    for assignments, experts, block_m in [(1, 8, 16), (16, 128, 16), (64, 8, 64), (8192, 8, 128), (100, 3, 32)]:
        worst = min(experts, assignments)  # as many experts as possible with one row, the rest on one expert
        counts = [1] * (worst - 1) + [assignments - worst + 1]
        tiles = sum(-(-c // block_m) for c in counts)
        assert tiles <= kernel.max_m_tiles(assignments, experts, block_m), (assignments, experts, block_m)


def test_public_function_on_cpu(gen):
    """On CPU tensors fused_moe runs the experts' loop in x's dtype."""
    x, w13, w2, weights, ids = draw(5, 4, 2, 16, 16, torch.float32, gen)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), moe_reference(x, w13, w2, weights, ids, dtype=None))
    assert fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 16)


def test_routing():
    """Softmax over the experts in float32, the top k, renormalised or not; ids int32."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.75, 4.0]])
    probs = torch.softmax(logits, -1)
    weights, ids = select_experts(logits.half(), 2, renormalize=False)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.tolist() == [[1, 2], [3, 2]]
    assert torch.allclose(weights, probs.gather(1, ids.long()), atol=1e-3)
    renorm, _ = select_experts(logits, 2, renormalize=True)
    assert torch.allclose(renorm.sum(-1), torch.ones(2)) and torch.allclose(renorm, weights / weights.sum(-1, True),
                                                                            atol=1e-3)


def _args(**changes):
    x = torch.randn(3, 16)
    args = dict(x=x, w13=torch.randn(4, 32, 16), w2=torch.randn(4, 16, 16), topk_weights=torch.rand(3, 2),
                topk_ids=torch.zeros(3, 2, dtype=torch.int32))
    return {**args, **changes}


ERRORS = {
    "x_not_tensor": (dict(x=[[1.0]]), r"^x must be a torch.Tensor"),
    "x_int": (dict(x=torch.ones(3, 16, dtype=torch.int32)), r"^x must be float16/bfloat16/float32"),
    "w13_hidden": (dict(w13=torch.randn(4, 32, 8)), r"^w13 must be \[experts, 2 \* inter, hidden=16\]"),
    "w13_odd": (dict(w13=torch.randn(4, 31, 16)), r"^w13 must be"),
    "w2_shape": (dict(w2=torch.randn(4, 16, 8)), r"^w2 must be \[experts=4, hidden=16, inter=16\]"),
    "w2_dtype": (dict(w2=torch.randn(4, 16, 16).half()), r"^w2 has dtype torch.float16 but x has torch.float32"),
    "w13_strided": (dict(w13=torch.randn(4, 16, 32).transpose(1, 2)), r"^w13 must be contiguous in its last"),
    "ids_int64": (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int64)), r"^topk_ids must be int32 \[tokens=3"),
    "ids_tokens": (dict(topk_ids=torch.zeros(2, 2, dtype=torch.int32)), r"^topk_ids must be int32"),
    "top_k": (dict(topk_ids=torch.zeros(3, 5, dtype=torch.int32), topk_weights=torch.rand(3, 5)),
              r"^top_k \(5\) must be between 1 and the number of experts \(4\)"),
    "weights_dtype": (dict(topk_weights=torch.rand(3, 2).half()), r"^topk_weights must be float32"),
    "weights_strided": (dict(topk_weights=torch.rand(2, 3).T), r"^topk_weights must be contiguous"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(name):
    changes, pattern = ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        fused_moe(**_args(**changes))


@pytest.mark.parametrize(("config", "pattern"), [
    (MoEConfig(GemmConfig(8, 32, 32), GemmConfig(16, 16, 16)), r"config.gate_up.block_m must be a power of two"),
    (MoEConfig(GemmConfig(16, 32, 32), GemmConfig(16, 48, 16)), r"config.down.block_n must be a power of two"),
    (MoEConfig(GemmConfig(16, 32, 32, num_warps=3), GemmConfig(16, 16, 16)), r"config.gate_up: num_warps"),
])
def test_config_errors(config, pattern):
    with pytest.raises(ValueError, match=pattern):
        config.validate()
