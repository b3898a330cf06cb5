"""Build a model from a Hugging Face folder: config.json plus safetensors weights (one file or an index of shards)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tritium.models.config import ModelConfig
from tritium.models.llama import LlamaForCausalLM

# Hugging Face's separate projections -> (our fused module, its shard).
FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
         "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a folder, through model.safetensors.index.json when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors weights")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{model_dir}: the weight index names files that are missing: {', '.join(missing)}")
    return files


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """Instantiate the family's model on `device` in `dtype` and fill every parameter from the folder."""
    model_dir = Path(model_dir)
    config = ModelConfig.load(model_dir)
    model = _build(config, dtype, device)
    params = dict(model.named_parameters())
    unfilled = {name: p.numel() for name, p in params.items()}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                target, rows = _place(name, model, params)
                if target is None:
                    raise ValueError(f"{path.name}: weight {name} has no place in a {config.family} model")
                param = params[target]
                tensor = f.get_tensor(name)
                dest = param.data if rows is None else param.data.narrow(0, rows[0], rows[1])
                if dest.shape != tensor.shape:
                    raise ValueError(f"{path.name}: {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(dest.shape)}")
                dest.copy_(tensor)
                unfilled[target] -= tensor.numel()
    if config.tie_word_embeddings:
        unfilled.pop("lm_head.weight", None)
    missing = [name for name, left in unfilled.items() if left > 0]
    if missing:
        raise ValueError(f"{model_dir}: no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def _place(name: str, model: torch.nn.Module, params: dict) -> tuple[str | None, tuple[int, int] | None]:
    """Our parameter for a Hugging Face weight name, and the rows it fills in a fused parameter."""
    if name in params:
        return name, None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in FUSED:
            fused, shard = FUSED[part]
            target = ".".join(parts[:i] + [fused] + parts[i + 1:])
            if target in params:
                return target, model.get_submodule(target.rsplit(".", 1)[0]).shards[shard]
    return None, None


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                 ) -> LlamaForCausalLM:
    """Seeded random weights in the family's shape (matrices normal with std 0.02, norms 1): benchmarks of a
    real model's shape with nothing downloaded."""
    model = _build(config, dtype, device)
    g = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=g)
    return model.eval()


def _build(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """The family's model on `device` with parameters in `dtype` (not model.to(dtype): the rotary table stays
    float32)."""
    with torch.device(device):
        model = LlamaForCausalLM(config)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model
