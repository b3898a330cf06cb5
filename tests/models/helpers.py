"""Shared helpers of the model tests: tiny random Hugging Face folders of every family, a paged batch over
Tritium's model, and the comparison with transformers on the same prompts.

A family is saved as a Hugging Face folder, loaded by Tritium's loader, and run on a batch of prompts of different
lengths laid out in a paged KV cache: a prefill of all prompts in one step, then decode steps (and a chunked
continuation), each sequence's logits compared with transformers' on that sequence.
"""

import torch
import transformers

from tritium.models.attention import AttentionMetadata
from tritium.models.loader import load_model

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
# Gemma's soft-caps only bite on logits of their size: weights 10x transformers' default spread make attention
# logits of a few units, and caps of that order.
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, initializer_range=0.2,
              attn_implementation="eager")
FAMILIES = {
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=6)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, num_key_value_heads=1)),
    # Sliding layers 0 (window 6, shorter than the longer prompts) and global layer 1; soft-capped logits.
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
        **_GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # Sliding, global, sliding; the global layer's RoPE base scaled linearly, the sliding layers' own base.
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        **_GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        num_local_experts=4, num_experts_per_tok=2)),
    # Layer 1 keeps a dense MLP; top-3 of 6 experts, weights not renormalised.
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
        head_dim=32)),
}
PAGE = 4


def save_family(name: str, path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Save a tiny random model of the family (SMALL sizes, changed by `overrides`) as a Hugging Face folder."""
    config_cls, model_cls, extra = FAMILIES[name]
    fields = {**SMALL, **extra, **overrides}
    attn = fields.pop("attn_implementation", None)
    torch.manual_seed(seed)
    config = config_cls(**fields)
    if attn:
        config._attn_implementation = attn
    hf = model_cls(config).float().eval()
    with torch.no_grad():  # random biases and norms too, so that skipping one would show
        for pname, p in hf.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


class PagedBatch:
    """Sequences with their own pages in one pool; `step` lays out the next tokens of some of them."""

    def __init__(self, model, num_seqs: int, max_len: int, backend: str) -> None:
        cfg = model.config
        self.device = model.lm_head.weight.device
        blocks = -(-max_len // PAGE)
        shape = (num_seqs * blocks + 1, PAGE, cfg.num_kv_heads, cfg.head_dim)
        nan = float("nan")
        self.caches = [tuple(torch.full(shape, nan, device=self.device) for _ in "kv") for _ in range(cfg.num_layers)]
        order = torch.randperm(shape[0] - 1, generator=torch.Generator().manual_seed(1)) + 1  # page 0 never used
        self.table = order.view(num_seqs, blocks).to(torch.int32)
        self.lengths = [0] * num_seqs
        self.model, self.backend = model, backend

    @torch.no_grad()
    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed new tokens per sequence; returns each fed sequence's logits for its new tokens."""
        ids, pos, slots, cu, used, rows = [], [], [], [0], [], []
        for seq, toks in new_tokens.items():
            start = self.lengths[seq]
            for i, t in enumerate(toks):
                p = start + i
                ids.append(t)
                pos.append(p)
                slots.append(int(self.table[seq, p // PAGE]) * PAGE + p % PAGE)
            self.lengths[seq] += len(toks)
            cu.append(cu[-1] + len(toks))
            used.append(self.lengths[seq])
            rows.append(seq)
        on = {"device": self.device}
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, **on),
            seqused_k=torch.tensor(used, dtype=torch.int32, **on),
            block_table=self.table[rows].contiguous().to(self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, **on),
            max_seqlen_q=max(len(t) for t in new_tokens.values()), max_seqlen_k=max(used), backend=self.backend)
        hidden = self.model(torch.tensor(ids, **on), torch.tensor(pos, **on), meta, self.caches)
        logits = self.model.logits(hidden).cpu()
        return {seq: logits[cu[i]:cu[i + 1]] for i, seq in enumerate(new_tokens)}


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = ((ours - theirs).norm() / theirs.norm()).item()
    assert err < 1e-4, f"relative error {err:.2e}"
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def check_against_transformers(family: str, backend: str, path, device: str = "cpu") -> None:
    """A prefill of four prompts (1 to 11 tokens) in one step, three greedy decode steps following transformers'
    tokens, then a 6-token chunk on a cached prefix beside a decode: logits close, greedy tokens equal. Tritium's
    model runs on `device` (transformers' on the CPU)."""
    hf = save_family(family, path)
    model = load_model(path, torch.float32, device)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 11, 1, 8)]
    batch = PagedBatch(model, len(prompts), 32, backend)

    out = batch.step(dict(enumerate(prompts)))  # every prompt prefilled in one step
    for seq, prompt in enumerate(prompts):
        assert_close(out[seq], hf_logits(hf, prompt))
    seqs = [list(p) for p in prompts]
    for _ in range(3):  # decode steps: each sequence takes Hugging Face's greedy token
        for s in seqs:
            s.append(int(hf_logits(hf, s)[-1].argmax()))
        out = batch.step({i: [s[-1]] for i, s in enumerate(seqs)})
        for i, s in enumerate(seqs):
            assert_close(out[i], hf_logits(hf, s)[-1:])
    extra = torch.randint(0, 96, (6,), generator=g).tolist()  # a chunk appended to a cached prefix, mixed with a decode
    seqs[1] += extra
    seqs[2].append(7)
    out = batch.step({1: extra, 2: [7]})
    assert_close(out[1], hf_logits(hf, seqs[1])[-6:])
    assert_close(out[2], hf_logits(hf, seqs[2])[-1:])
