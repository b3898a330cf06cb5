"""Next-token choice on the logits' device: greedy, or temperature with top-k, top-p and min-p filters."""

import torch

from tritium.engine.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [rows, vocab] (float32)."""
    out = logits.argmax(dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        if p.top_k:
            kth = torch.topk(probs, min(p.top_k, probs.numel())).values[-1]
            probs = torch.where(probs >= kth, probs, 0.0)
        if p.min_p > 0:
            probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
            keep = torch.zeros_like(probs, dtype=torch.bool)
            keep[order] = before < p.top_p * sorted_probs.sum()
            probs = torch.where(keep, probs, 0.0)
        out[row] = torch.multinomial(probs / probs.sum(), 1, generator=gen)[0]
    return out.tolist()
