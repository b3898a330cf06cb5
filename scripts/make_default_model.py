"""Build the default model folder that ships in the package (`tritium/default_model/`), reproducibly.

A byte-level BPE tokenizer trained on the Python documentation topics every Python installation carries
(`pydoc_data.topics`), a chat template, and a small Llama-shaped model with seeded random weights. The
weights are untrained placeholders until a trained demo model replaces them: the text they produce is
noise, but every part of the pipeline (tokenizer, chat template, engine, kernels) runs on a real folder.

    python scripts/make_default_model.py [--out tritium/default_model]
"""

import argparse
import json
from pathlib import Path
from pydoc_data.topics import topics

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048, "hidden_size": 128,
    "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0,
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CARD = """# Tritium's default model (placeholder)

Random weights (seed 0) in a Llama shape: {params:,} parameters, bf16, vocabulary {vocab} (byte-level BPE
trained on Python's `pydoc_data.topics`). It has not been trained: its text is noise. It exists so that
`tritium generate` runs on any machine with nothing downloaded. Rebuild: `python scripts/make_default_model.py`.
"""


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return tok


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face Llama parameter names; normal(0, 0.02) matrices, unit norms."""
    g = torch.Generator().manual_seed(seed)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def mat(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": mat(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h).bfloat16()}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w.update({
            p + "input_layernorm.weight": torch.ones(h).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(h).bfloat16(),
            p + "self_attn.q_proj.weight": mat(q, h), p + "self_attn.k_proj.weight": mat(kv, h),
            p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.o_proj.weight": mat(h, q),
            p + "mlp.gate_proj.weight": mat(i, h), p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i),
        })
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tritium" / "default_model")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(CONFIG["vocab_size"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
        "model_max_length": CONFIG["max_position_embeddings"]}, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "max_new_tokens": 64}, indent=1) + "\n")
    weights = random_weights(CONFIG)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    params = sum(t.numel() for t in weights.values())
    (out / "README.md").write_text(CARD.format(params=params, vocab=CONFIG["vocab_size"]))
    print(f"wrote {out}: {params:,} parameters, vocabulary {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
