"""Train Tritium's small demo model from text every Python installation carries, reproducibly (seeded).

Data: the documentation topics of `pydoc_data` and the docstrings and comment blocks of the standard library's
own source files (read with `ast` and `tokenize`, nothing imported), split into training and held-out documents
(every 20th is held out). A byte-level BPE tokenizer is trained with `tokenizers` on the training documents; a
Llama-style model (Hugging Face parameter names, so Tritium and transformers load the folder) is trained on random
windows of the token stream. Writes a Hugging Face folder: config.json, model.safetensors (bf16), tokenizer files
with a chat template, generation_config.json, a model card (README.md) and the loss curve (loss_curve.png).

    python scripts/train_demo_model.py --out tritium/default_model            # the demo model (GPU: minutes)
    python scripts/train_demo_model.py --size tiny --steps 30 --out /tmp/m    # a smoke run on a CPU
"""

import argparse
import ast
import io
import json
import math
import platform
import sysconfig
import time
import tokenize
from pathlib import Path
from pydoc_data.topics import topics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

EOT = "<|endoftext|>"
SPECIAL = [EOT, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Sampling defaults for the folder (transformers' names): a model this small reads best sampled a little cool.
GENERATION_DEFAULTS = {"eos_token_id": 0, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}
SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "demo": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=704, vocab_size=4096),
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=48, vocab_size=320),
}


def documents(max_docs: int | None = None) -> list[str]:
    """pydoc's topics, then the docstrings and comment blocks of the standard library's sources, in a fixed order."""
    docs = [topics[k].strip() for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    for path in sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file the running Python cannot parse (e.g. a test fixture)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc.strip())
        docs += comment_blocks(path.read_text(encoding="utf-8"))
        if max_docs and len(docs) >= max_docs:
            break
    return docs[:max_docs] if max_docs else docs


def comment_blocks(source: str, min_chars: int = 80) -> list[str]:
    """Runs of `#` comments on consecutive lines, each joined into one paragraph (the source's prose that is not a
    docstring)."""
    blocks, lines, last_row = [], [], -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        if tok.start[0] != last_row + 1 and lines:
            blocks.append(" ".join(lines))
            lines = []
        if text:
            lines.append(text)
        last_row = tok.start[0]
    blocks.append(" ".join(lines))
    return [b for b in blocks if len(b) >= min_chars]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream of ids, each followed by the end-of-text token."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


class Block(nn.Module):
    def __init__(self, c: dict, dropout: float) -> None:
        super().__init__()
        h, d = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
        self.dropout = nn.Dropout(dropout)  # on each residual branch; off in eval()
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], d
        self.input_layernorm = nn.RMSNorm(h, eps=c["rms_norm_eps"])
        self.post_attention_layernorm = nn.RMSNorm(h, eps=c["rms_norm_eps"])
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(h, self.heads * d, bias=False),
                                        "k_proj": nn.Linear(h, self.kv_heads * d, bias=False),
                                        "v_proj": nn.Linear(h, self.kv_heads * d, bias=False),
                                        "o_proj": nn.Linear(self.heads * d, h, bias=False)})
        i = c["intermediate_size"]
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(h, i, bias=False), "up_proj": nn.Linear(h, i, bias=False),
                                  "down_proj": nn.Linear(i, h, bias=False)})

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.self_attn
        y = self.input_layernorm(x)
        q = a["q_proj"](y).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = a["k_proj"](y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a["v_proj"](y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.dropout(a["o_proj"](y.transpose(1, 2).reshape(b, t, -1)))
        y = self.post_attention_layernorm(x)
        m = self.mlp
        return x + self.dropout(m["down_proj"](F.silu(m["gate_proj"](y)) * m["up_proj"](y)))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's layout: the two halves of each head rotate as pairs."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TrainingLlama(nn.Module):
    """A Llama for training on fixed-length windows; its state dict carries Hugging Face's names."""

    def __init__(self, c: dict, dropout: float = 0.0) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(Block(c, dropout) for _ in range(c["num_hidden_layers"]))
        self.model.norm = nn.RMSNorm(c["hidden_size"], eps=c["rms_norm_eps"])
        d = c["hidden_size"] // c["num_attention_heads"]
        self.register_buffer("inv_freq", 1.0 / c["rope_theta"] ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        angles = torch.arange(ids.shape[1], device=ids.device).float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x) @ self.model.embed_tokens.weight.T  # tied output projection


def hf_state_dict(model: TrainingLlama) -> dict[str, torch.Tensor]:
    """Parameter names as Hugging Face writes them (the ModuleDicts already use its names), in bf16."""
    return {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def held_out_loss(model: TrainingLlama, stream: torch.Tensor, seq_len: int, device: torch.device,
                  max_windows: int = 256) -> float:
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    losses = []
    for i in range(0, n, 32):
        idx = torch.arange(i, min(n, i + 32)) * seq_len
        x = torch.stack([stream[j:j + seq_len] for j in idx]).to(device)
        y = torch.stack([stream[j + 1:j + seq_len + 1] for j in idx]).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item())
    model.train()
    return sum(losses) / (n * seq_len)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--eval-every", type=int, default=50,
                        help="held-out loss every N steps; the weights with the lowest are the ones saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (smoke runs)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    docs = documents(args.max_docs)
    train_docs = [d for i, d in enumerate(docs) if i % 20]
    held_docs = [d for i, d in enumerate(docs) if i % 20 == 0]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SIZES[args.size],
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}
    tok = train_tokenizer(train_docs, config["vocab_size"])
    train_ids, held_ids = token_stream(tok, train_docs), token_stream(tok, held_docs)

    model = TrainingLlama(config, args.dropout).to(device)
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, 0.0, 0.02)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))))
    g = torch.Generator().manual_seed(args.seed)
    curve, held_curve = [], [(0, held_out_loss(model, held_ids, args.seq_len, device))]
    best_step, best = 0, hf_state_dict(model)
    bar = tqdm(range(1, args.steps + 1), desc="training", unit="step")
    for step in bar:
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch_size,), generator=g)
        x = torch.stack([train_ids[s:s + args.seq_len] for s in starts]).to(device, non_blocking=True)
        y = torch.stack([train_ids[s + 1:s + args.seq_len + 1] for s in starts]).to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        curve.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            held_curve.append((step, held_out_loss(model, held_ids, args.seq_len, device)))
            if held_curve[-1][1] < min(h for _, h in held_curve[:-1]):
                best_step, best = step, hf_state_dict(model)
            bar.set_postfix(loss=f"{curve[-1]:.3f}", held_out=f"{held_curve[-1][1]:.3f}")
    held = dict(held_curve)[best_step]
    seconds = time.perf_counter() - start

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOT, "pad_token": EOT,
        "chat_template": CHAT_TEMPLATE, "model_max_length": config["max_position_embeddings"]}, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_DEFAULTS, indent=1) + "\n")
    save_file(best, str(out / "model.safetensors"), metadata={"format": "pt"})
    card = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    report = {"parameters": params, "train_tokens": len(train_ids), "held_out_tokens": len(held_ids),
              "documents": len(docs), "steps": args.steps, "batch": args.batch_size, "seq_len": args.seq_len,
              "lr": args.lr, "dropout": args.dropout, "saved_step": best_step,
              "first_loss": curve[0] if curve else math.nan, "final_loss": curve[-1] if curve else math.nan,
              "held_out_loss": held, "held_out_perplexity": math.exp(held), "seconds": seconds, "card": card,
              "weights_mb": round((out / "model.safetensors").stat().st_size / 1e6, 1),
              "python": platform.python_version(), "torch": torch.__version__, "seed": args.seed}
    if curve:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(curve) + 1), curve, linewidth=0.8, label="training batch")
        ax.plot(*zip(*held_curve), marker=".", label="held-out documents")
        ax.axvline(best_step, color="gray", linestyle=":", label=f"saved (step {best_step})")
        ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{params:,} parameters on {card}; held-out perplexity {math.exp(held):.1f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png", dpi=110)
        plt.close(fig)
    trained = ("Untrained: seeded random weights, a placeholder whose text is noise (`--steps 0`)." if not args.steps
               else f"Trained on Python {platform.python_version()}'s own documentation: the `pydoc_data` topics and "
               "the standard library's docstrings and comment blocks (every 20th document held out; another Python "
               "version carries slightly different text). The weights saved are those of the step with the lowest "
               "held-out loss.")
    (out / "README.md").write_text(
        f"# Tritium's demo model\n\nA Llama-style model made by `scripts/train_demo_model.py` (seed {args.seed}, "
        f"size `{args.size}`, {args.steps} steps). {trained}\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in report.items())
        + ("\n\nLoss curve: `loss_curve.png`.\n" if curve else "\n")
        + f"\nRebuild: `python scripts/train_demo_model.py --out DIR --size {args.size} --steps {args.steps} "
        f"--seed {args.seed}` (defaults for the rest).\n")
    print(f"{params:,} parameters, {len(train_ids):,} training tokens, {args.steps} steps in {seconds:.0f} s on "
          f"{card}; held-out perplexity {math.exp(held):.2f}; wrote {out}")
    return report


if __name__ == "__main__":
    main()
