"""`tritium generate`: prompts from the command line streamed to the terminal, or a JSONL file of prompts in and
a JSONL file of results out. Without a model folder, the small default model that ships with the package."""

import json
import sys
from importlib import resources
from pathlib import Path

from tritium.engine.config import EngineConfig
from tritium.engine.llm import LLM
from tritium.engine.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 64  # where neither the user nor the model's generation_config.json sets max_new_tokens

DEFAULT_MODEL_NOTE = ("Using Tritium's built-in demo model (7M parameters trained on Python's own documentation; "
                      "see tritium/default_model/README.md). Give --model DIR for a Hugging Face model folder.")


def default_model_dir() -> Path:
    return Path(str(resources.files("tritium").joinpath("default_model")))


def read_prompts(path: Path) -> list[dict]:
    """JSONL lines of {"prompt": str}, {"prompt_token_ids": [int, ...]} or {"messages": [...]}; every line is
    checked before anything runs, and a bad one is named by its line number."""
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(item, dict) or len({"prompt", "prompt_token_ids", "messages"} & set(item)) != 1:
                raise ValueError(f"{path}:{number}: give exactly one of 'prompt', 'prompt_token_ids', 'messages'")
            if "prompt" in item and not isinstance(item["prompt"], str):
                raise ValueError(f"{path}:{number}: 'prompt' must be a string")
            ids = item.get("prompt_token_ids", [])
            if not isinstance(ids, list) or not all(type(t) is int for t in ids):
                raise ValueError(f"{path}:{number}: 'prompt_token_ids' must be a list of integers")
            if "messages" in item and not isinstance(item["messages"], list):
                raise ValueError(f"{path}:{number}: 'messages' must be a list of {{'role', 'content'}} objects")
            items.append(item)
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def run_generate(
    model: str | None, prompts: list[str], input_path: Path | None, output_path: Path | None,
    sampling: dict, config: EngineConfig, chat: bool = False,
) -> None:
    """Stream each command-line prompt's text to standard output, or run a JSONL file as one batch into
    `output_path` (standard output when None). `sampling` holds the SamplingParams fields the user set; the
    model's generation_config.json fills the rest, and 64 tokens at most where it says nothing."""
    out = sys.stdout
    if model is None:
        print(DEFAULT_MODEL_NOTE, file=sys.stderr)
        model = str(default_model_dir())
    llm = LLM.from_config(model, config)
    params = SamplingParams(**{"max_tokens": DEFAULT_MAX_TOKENS, **llm.engine.sampling_defaults, **sampling})
    if input_path is None:
        for prompt in prompts:
            if chat:
                prompt = llm.chat_prompt([{"role": "user", "content": prompt}])
            else:
                out.write(prompt)
            for piece in llm.stream(prompt, params):
                out.write(piece)
                out.flush()
            out.write("\n")
        return
    items = read_prompts(input_path)
    batch = [llm.chat_prompt(item["messages"]) if "messages" in item else item for item in items]
    results = llm.generate(batch, params)
    lines = []
    for i, (item, res) in enumerate(zip(items, results, strict=True)):
        for o in res.outputs:
            lines.append(json.dumps({"index": i, "sample": o.index, **item, "text": o.text, "token_ids": o.token_ids,
                                     "finish_reason": o.finish_reason}, ensure_ascii=False))
    if output_path is None:
        out.write("\n".join(lines) + "\n")
    else:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} results to {output_path}", file=sys.stderr)

