"""A model folder's `config.json`, read into the few numbers the supported families need."""

import json
from dataclasses import dataclass
from pathlib import Path

# Architecture name in config.json -> family. The Llama-like families share llama.py; Gemma 2 and 3 have
# gemma.py, the mixture-of-experts families moe.py, all over the same layers.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
GEMMA = ("gemma2", "gemma3")
ROPE_TYPES = ("default", "llama3", "linear")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or {"rope_type": "linear"...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    layer_windows: tuple[int | None, ...]  # each layer's sliding window (Mistral: all; Gemma: the sliding layers)
    torch_dtype: str
    attention_scale: float  # softmax scale: head_dim ** -0.5, Gemma's query_pre_attn_scalar ** -0.5
    hidden_act: str = "silu"  # the gated MLP's activation: silu, or gelu_pytorch_tanh (Gemma's GeGLU)
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), and the embeddings by sqrt(hidden)
    attn_softcap: float = 0.0  # Gemma 2: tanh soft-cap of the attention logits (0: none)
    final_softcap: float = 0.0  # Gemma 2: tanh soft-cap of the output logits (0: none)
    local_rope_theta: float | None = None  # Gemma 3: RoPE base of sliding layers (unscaled); the others: rope_*
    num_experts: int = 0  # mixture of experts (Mixtral, Qwen3-MoE); 0: dense MLPs
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    sparse_layers: tuple[bool, ...] = ()  # which layers have experts (the others a dense MLP)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Validate a parsed config.json; unsupported architectures and missing fields raise ValueError."""
        archs = raw.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            raise ValueError(f"unsupported architecture {', '.join(archs) or '(none named)'} "
                             f"(supported: {', '.join(ARCHITECTURES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(raw.get(key), int) or raw[key] <= 0:
                raise ValueError(f"config.json: {key} must be a positive integer, got {raw.get(key)!r}")
        num_heads = raw["num_attention_heads"]
        num_kv_heads = raw.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"config.json: num_attention_heads ({num_heads}) is not a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        gemma = family in GEMMA
        scale_base = (raw.get("query_pre_attn_scalar") or 256) if gemma else head_dim
        theta, scaling, local_theta = _rope(raw, family)
        act = raw.get("hidden_activation") or raw.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"config.json: activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        for key in ("use_sliding_window", "use_bidirectional_attention"):
            if raw.get(key) and family != "mistral":
                raise ValueError(f"config.json: {key} is not supported for {family}")
        return cls(
            family=family,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
            qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=family in ("qwen3", "gemma3", "qwen3_moe"),
            layer_windows=_layer_windows(raw, family),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            attention_scale=float(scale_base) ** -0.5,
            hidden_act=act,
            norm_unit_offset=gemma,
            attn_softcap=float(raw.get("attn_logit_softcapping", 50.0 if family == "gemma2" else None) or 0.0),
            final_softcap=float(raw.get("final_logit_softcapping", 30.0 if family == "gemma2" else None) or 0.0),
            local_rope_theta=local_theta,
            **_experts(raw, family),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} is not a model folder: config.json is missing")
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)


def _rope(raw: dict, family: str) -> tuple[float, dict | None, float | None]:
    """(RoPE base, scaling of the global layers or None, Gemma 3's base of the sliding layers or None)."""
    # transformers 5 writes rope_parameters (theta inside; per layer type for Gemma 3); older folders have
    # rope_theta / rope_scaling, and Gemma 3's rope_local_base_freq.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    local_theta = raw.get("rope_local_base_freq", 10000.0) if family == "gemma3" else None
    if "full_attention" in rope:
        local = dict(rope.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: the sliding layers' rope type {local['rope_type']!r} is not supported")
        local_theta = local.get("rope_theta", local_theta)
        rope = dict(rope["full_attention"])
    default_theta = 1000000.0 if family == "gemma3" else 10000.0
    theta = float(rope.pop("rope_theta", raw.get("rope_theta", default_theta)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    return theta, (rope if rope_type != "default" else None), None if local_theta is None else float(local_theta)


def _layer_windows(raw: dict, family: str) -> tuple[int | None, ...]:
    """Each layer's sliding window: Mistral's and Mixtral's on every layer; Gemma's on the layers its
    layer_types (or, in older folders, its alternating or 5:1 pattern) call sliding."""
    n, window = raw["num_hidden_layers"], raw.get("sliding_window")
    if family in ("mistral", "mixtral"):
        return (int(window) if window else None,) * n
    if family not in ("gemma2", "gemma3"):
        return (None,) * n
    pattern = 2 if family == "gemma2" else int(raw.get("sliding_window_pattern", 6))
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                       for i in range(n)]
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types must name sliding_attention or full_attention for each of the "
                         f"{n} layers, got {types}")
    if not window and "sliding_attention" in types:
        raise ValueError("config.json: sliding layers need a positive sliding_window")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _experts(raw: dict, family: str) -> dict:
    """The mixture-of-experts fields of ModelConfig (none for a dense family)."""
    if family not in ("mixtral", "qwen3_moe"):
        return {}
    n = raw["num_hidden_layers"]
    num_experts = raw.get("num_local_experts") if family == "mixtral" else raw.get("num_experts")
    num_experts = num_experts or raw.get("num_local_experts")
    top_k = raw.get("num_experts_per_tok")
    inter = raw["intermediate_size"] if family == "mixtral" else raw.get("moe_intermediate_size")
    for key, value in (("num_experts", num_experts), ("num_experts_per_tok", top_k), ("moe_intermediate_size", inter)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"config.json: num_experts_per_tok ({top_k}) exceeds the number of experts ({num_experts})")
    if family == "mixtral":
        sparse = (True,) * n
    else:
        dense, step = set(raw.get("mlp_only_layers") or []), int(raw.get("decoder_sparse_step", 1))
        sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(n))
    return {"num_experts": num_experts, "experts_per_token": top_k, "moe_intermediate_size": inter,
            "norm_topk_prob": family == "mixtral" or bool(raw.get("norm_topk_prob", False)), "sparse_layers": sparse}
