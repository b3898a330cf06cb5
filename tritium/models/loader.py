"""Build a model from a Hugging Face folder: config.json plus safetensors weights (one file or an index of shards)."""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from tritium.models.config import ModelConfig
from tritium.models.gemma import GemmaForCausalLM
from tritium.models.llama import LlamaForCausalLM, RMSNorm
from tritium.models.moe import MoeForCausalLM

# Family -> model class (the Llama-like families: LlamaForCausalLM).
MODEL_CLASSES = {"gemma2": GemmaForCausalLM, "gemma3": GemmaForCausalLM, "mixtral": MoeForCausalLM,
                 "qwen3_moe": MoeForCausalLM}
# Hugging Face's separate projections -> (our fused module, its shard).
FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
         "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
# A checkpoint's per-expert matrix: (layer, expert, matrix name). Mixtral's checkpoints call the MoE module
# block_sparse_moe; ours, as transformers 5, mlp.
EXPERT = re.compile(r"(?P<layer>.+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<matrix>\w+)\.weight")
# A weight's place in a parameter: (parameter name, expert index or None, rows (start, count) or None).
Place = tuple[str | None, int | None, tuple[int, int] | None]


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
                target, expert, rows = _place(name, model, params)
                if target is None:
                    raise ValueError(f"{path.name}: weight {name} has no place in a {config.family} model")
                dest = params[target].data
                dest = dest if expert is None else dest[expert]
                dest = dest if rows is None else dest.narrow(0, rows[0], rows[1])
                tensor = f.get_tensor(name)
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


def _place(name: str, model: torch.nn.Module, params: dict) -> Place:
    """Our parameter for a Hugging Face weight name, the expert it belongs to in a stacked expert parameter, and
    the rows it fills in a fused one."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    if name in params:
        return name, None, None
    m = EXPERT.fullmatch(name)
    if m is not None:
        experts = f"{m['layer']}.mlp.experts"
        matrices = model.get_submodule(experts).per_expert if f"{experts}.down_proj" in params else {}
        if m["matrix"] in matrices:
            param, rows = matrices[m["matrix"]]
            return f"{experts}.{param}", int(m["expert"]), rows
        return None, None, None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in FUSED:
            fused, shard = FUSED[part]
            target = ".".join(parts[:i] + [fused] + parts[i + 1:])
            if target in params:
                return target, None, model.get_submodule(target.rsplit(".", 1)[0]).shards[shard]
    return None, None, None


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                 ) -> LlamaForCausalLM:
    """Seeded random weights in the family's shape (matrices normal with std 0.02, norms the identity): benchmarks
    of a real model's shape with nothing downloaded."""
    model = _build(config, dtype, device)
    g = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, RMSNorm):
            param.data.fill_(0.0 if owner.unit_offset else 1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=g)
    return model.eval()


def _build(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> LlamaForCausalLM:
    """The family's model on `device`, its parameters made in `dtype` (a 47B model would not fit made in float32
    first); the rotary tables stay float32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MODEL_CLASSES.get(config.family, LlamaForCausalLM)(config)
    finally:
        torch.set_default_dtype(default)
    return model
