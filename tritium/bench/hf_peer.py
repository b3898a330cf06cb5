"""The Hugging Face transformers model that holds the same weights as a Tritium model, for peer timings."""

import torch

from tritium.models.llama import LlamaForCausalLM

FAMILY_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                     "gemma3": "gemma3_text", "mixtral": "mixtral", "qwen3_moe": "qwen3_moe"}


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Tritium's parameters under Hugging Face's names: fused projections split back into their shards."""
    out, seen = {}, set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied lm_head is the embedding
                continue
            seen.add(id(p))
            full = f"{name}.{pname}" if name else pname
            shards = getattr(module, "shards", None)
            if not shards:
                out[full] = p
                continue
            base = name.rsplit(".", 1)[0]
            for shard, (start, size) in shards.items():
                out[f"{base}.{shard}_proj.{pname}"] = p[start:start + size]
    return out


def hf_model_like(weights: dict[str, torch.Tensor], raw_config: dict, family: str, dtype: torch.dtype,
                  ) -> torch.nn.Module:
    """A transformers model built from config.json fields on the GPU, loaded with `weights` (hf_state_dict's)."""
    import transformers

    fields = {k: v for k, v in raw_config.items() if k != "architectures"}
    config = transformers.AutoConfig.for_model(FAMILY_MODEL_TYPE[family], **fields)
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    return hf.eval()
