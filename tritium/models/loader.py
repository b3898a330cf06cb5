"""Build a model from a Hugging Face folder: config.json plus safetensors weights (one file or an index of shards)."""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from tritium import distributed
from tritium.models.config import ModelConfig
from tritium.models.gemma import GemmaForCausalLM
from tritium.models.llama import LlamaForCausalLM, RMSNorm
from tritium.models.moe import MoeForCausalLM
from tritium.models.parallel import Part, VocabParallelEmbedding

# Family -> model class (the Llama-like families: LlamaForCausalLM).
MODEL_CLASSES = {"gemma2": GemmaForCausalLM, "gemma3": GemmaForCausalLM, "mixtral": MoeForCausalLM,
                 "qwen3_moe": MoeForCausalLM}
# Hugging Face's separate projections -> (our fused module, its shard).
FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
         "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
# A checkpoint's per-expert matrix: (layer, expert, matrix name). Mixtral's checkpoints call the MoE module
# block_sparse_moe; ours, as transformers 5, mlp.
EXPERT = re.compile(r"(?P<layer>.+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<matrix>\w+)\.weight")
# A weight's place: (our parameter's name, the expert index in a stacked expert parameter, and the part it fills: a
# fused projection's shard name or an expert matrix's name; None for the whole).
Place = tuple[str | None, int | None, str | None]
# Where checkpoints keep an fp8 KV cache's per-layer scales (vLLM reads the same names) -> the attention module's
# buffers they fill: its own k_scale/v_scale (llm-compressor), ModelOpt's on the projections, Quark's projection output
# scales, and the older single kv_scale, which serves both.
KV_SCALES = {"k_scale": ("k_scale",), "v_scale": ("v_scale",), "k_proj.k_scale": ("k_scale",),
             "v_proj.v_scale": ("v_scale",), "k_proj.output_scale": ("k_scale",),
             "v_proj.output_scale": ("v_scale",), "kv_scale": ("k_scale", "v_scale")}


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
    """Instantiate the family's model on `device` in `dtype` and fill every parameter from the folder. Under tensor
    parallelism a rank reads only its slice of each tensor from the files (memory-mapped), never the whole model."""
    model_dir = Path(model_dir)
    config = ModelConfig.load(model_dir)
    model = _build(config, dtype, device)
    params = dict(model.named_parameters())
    unfilled = {name: _expected(model, name, p) for name, p in params.items()}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if "rotary_emb" in name:
                    continue
                if _load_kv_scale(name, f, model, path):
                    continue
                target, expert, part = _place(name, model, params)
                if target is None:
                    raise ValueError(f"{path.name}: weight {name} has no place in a {config.family} model")
                dest, dim, start, full = _part(model, target, expert, part)
                source = f.get_slice(name)
                expected = (*dest.shape[:dim], full, *dest.shape[dim + 1:])
                if tuple(source.get_shape()) != expected:
                    raise ValueError(f"{path.name}: {name} has shape {tuple(source.get_shape())}, expected {expected}")
                dest.copy_(source[(slice(None),) * dim + (slice(start, start + dest.shape[dim]),)])
                unfilled[target] -= dest.numel()
    missing = [name for name, left in unfilled.items() if left > 0]
    if missing:
        raise ValueError(f"{model_dir}: no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


def _expected(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> int:
    """How many of a parameter's numbers the files fill: all of them, but for a vocabulary split across ranks the
    rows past the vocabulary (padding)."""
    module = model.get_submodule(name.rpartition(".")[0])
    if isinstance(module, VocabParallelEmbedding):
        return module.rows * module.embedding_dim
    return param.numel()


def _part(model: torch.nn.Module, param: str, expert: int | None, part: str | None) -> Part:
    """Where a weight goes in our parameter and which slice of it this rank reads (models/parallel.py's Part)."""
    module_name, _, param_name = param.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "weight_part"):
        return module.weight_part(param_name, part)
    dest = getattr(module, param_name).data
    dest = dest if expert is None else dest[expert]
    rows = module.per_expert[part][1] if expert is not None else None
    dest = dest if rows is None else dest.narrow(0, rows[0], rows[1])
    return dest, 0, 0, dest.shape[0]


def _load_kv_scale(name: str, f, model: torch.nn.Module, path: Path) -> bool:
    """Copy a KV-cache scale into its attention module; False when `name` is not one."""
    layer, sep, rest = name.partition(".self_attn.")
    if not sep or rest not in KV_SCALES:
        return False
    try:
        attn = model.get_submodule(layer + ".self_attn")
    except AttributeError:
        return False  # no such layer: the caller names the weight
    scale = f.get_tensor(name).float()
    if scale.numel() != 1 or not 0 < scale.item() < float("inf"):
        raise ValueError(f"{path.name}: {name} must be one positive finite number, got {scale.flatten()[:4].tolist()}")
    for buffer in KV_SCALES[rest]:
        getattr(attn, buffer).fill_(scale.item())
    return True


def _place(name: str, model: torch.nn.Module, params: dict) -> Place:
    """Our parameter for a Hugging Face weight name, the expert it belongs to in a stacked expert parameter, and
    the part it fills."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    if name in params:
        return name, None, None
    m = EXPERT.fullmatch(name)
    if m is not None:
        experts = f"{m['layer']}.mlp.experts"
        matrices = model.get_submodule(experts).per_expert if f"{experts}.down_proj" in params else {}
        if m["matrix"] in matrices:
            return f"{experts}.{matrices[m['matrix']][0]}", int(m["expert"]), m["matrix"]
        return None, None, None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in FUSED:
            fused, shard = FUSED[part]
            target = ".".join(parts[:i] + [fused] + parts[i + 1:])
            if target in params:
                return target, None, shard
    return None, None, None


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                 ) -> LlamaForCausalLM:
    """Seeded random weights in the family's shape (matrices normal with std 0.02, norms the identity): benchmarks
    of a real model's shape with nothing downloaded. Each tensor-parallel rank draws its own slices (seed + rank)."""
    model = _build(config, dtype, device)
    g = torch.Generator(device).manual_seed(seed + distributed.rank())
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
