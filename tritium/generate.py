"""`tritium generate`: prompts from the command line streamed to the terminal, or a JSONL file of prompts in and
a JSONL file of results out. Each JSONL line may carry its own sampling fields (SamplingParams' names)."""

import dataclasses
import json
import sys
from pathlib import Path
from typing import TextIO

from tritium.engine.config import EngineConfig
from tritium.engine.llm import LLM
from tritium.engine.outputs import CompletionOutput
from tritium.engine.sampling_params import SamplingParams, StructuredOutputsParams
from tritium.models.config import ModelConfig

DEFAULT_MAX_TOKENS = 64  # where neither the user nor the model's generation_config.json sets max_new_tokens
PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
# What a result line holds besides its input line's fields; an input line may hold them too (a results file fed
# back), but they are the results' own: the new values replace them.
OUTPUT_FIELDS = ("index", "sample", "text", "token_ids", "finish_reason", "cumulative_logprob", "top_logprobs")


def read_prompts(path: Path, sampling: dict, token_ids_only: bool = False) -> list[dict]:
    """JSONL lines of {"prompt": str}, {"prompt_token_ids": [int, ...]} or {"messages": [...]}, each with optional
    sampling fields over `sampling` (the command line's). Every line is checked before anything runs, and a bad
    one is named by its line number. With `token_ids_only` (no tokenizer), only token-id prompts are taken."""
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    items.append(_check_line(json.loads(line), sampling, token_ids_only))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from None
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items


def _check_line(item: object, sampling: dict, token_ids_only: bool) -> dict:
    """One parsed line without its output fields; raises ValueError (or TypeError) saying what is wrong."""
    if not isinstance(item, dict) or len(set(PROMPT_FIELDS) & set(item)) != 1:
        raise ValueError(f"give exactly one of {', '.join(map(repr, PROMPT_FIELDS))}")
    unknown = sorted(set(item) - {*PROMPT_FIELDS, *SAMPLING_FIELDS, *OUTPUT_FIELDS})
    if unknown:
        raise ValueError(f"unknown field {', '.join(map(repr, unknown))}; a line holds a prompt field and "
                         f"sampling fields ({', '.join(SAMPLING_FIELDS)})")
    if "prompt" in item and not isinstance(item["prompt"], str):
        raise ValueError("'prompt' must be a string")
    ids = item.get("prompt_token_ids", [])
    if not isinstance(ids, list) or not all(type(t) is int for t in ids):
        raise ValueError("'prompt_token_ids' must be a list of integers")
    if "messages" in item and not isinstance(item["messages"], list):
        raise ValueError("'messages' must be a list of {'role', 'content'} objects")
    if token_ids_only and "prompt_token_ids" not in item:
        raise ValueError("without a tokenizer (--skip-tokenizer-init) a line needs 'prompt_token_ids'")
    SamplingParams(**{**sampling, **line_sampling(item)})  # bad values are named before the model loads
    return {k: v for k, v in item.items() if k not in OUTPUT_FIELDS}


def line_sampling(item: dict) -> dict:
    """A line's SamplingParams fields; `structured_outputs` is an object of StructuredOutputsParams' fields."""
    fields = {k: v for k, v in item.items() if k in SAMPLING_FIELDS}
    if isinstance(fields.get("structured_outputs"), dict):
        fields["structured_outputs"] = StructuredOutputsParams(**fields["structured_outputs"])
    return fields


def run_generate(model: str | ModelConfig, config: EngineConfig, sampling: dict, prompts: list[str],
                 items: list[dict] | None, output_path: Path | None, chat: bool = False) -> None:
    """Stream each command-line prompt's text to standard output, or run JSONL `items` (from read_prompts) as one
    batch into `output_path` (standard output when None). `sampling` holds the SamplingParams fields the user
    set; the model's generation_config.json fills the rest, and 64 tokens at most where it says nothing."""
    llm = LLM.from_config(model, config)
    base = {"max_tokens": DEFAULT_MAX_TOKENS, **llm.engine.sampling_defaults, **sampling}
    if items is None:
        stream_prompts(llm, prompts, SamplingParams(**base), chat, sys.stdout)
        return
    batch = [llm.chat_prompt(item["messages"]) if "messages" in item else item for item in items]
    results = llm.generate(batch, [SamplingParams(**{**base, **line_sampling(item)}) for item in items])
    lines = [json.dumps(result_line(i, item, o), ensure_ascii=False)
             for i, (item, res) in enumerate(zip(items, results, strict=True)) for o in res.outputs]
    if output_path is None:
        sys.stdout.write("\n".join(lines) + "\n")
    else:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} results to {output_path}", file=sys.stderr)


def stream_prompts(llm: LLM, prompts: list[str], params: SamplingParams, chat: bool, out: TextIO) -> None:
    """Each prompt and its text as it grows; with n > 1 the samples come whole, one after another, each under a
    `[sample k]` line."""
    for text in prompts:
        prompt = llm.chat_prompt([{"role": "user", "content": text}]) if chat else text
        head = "" if chat else text
        if params.n == 1:
            out.write(head)
            for piece in llm.stream(prompt, params):
                out.write(piece)
                out.flush()
            out.write("\n")
            continue
        for o in llm.generate(prompt, params, use_tqdm=False)[0].outputs:
            out.write(f"[sample {o.index}]\n{head}{o.text}\n")


def result_line(index: int, item: dict, out: CompletionOutput) -> dict:
    """A result: the input line's fields, then the output fields (which win over any of the same name); with
    logprobs asked, each token's top alternatives (and itself) as {token_id, logprob, rank, decoded_token}."""
    line = {**item, "index": index, "sample": out.index, "text": out.text, "token_ids": out.token_ids,
            "finish_reason": out.finish_reason}
    if out.logprobs is not None:
        line["cumulative_logprob"] = out.cumulative_logprob
        line["top_logprobs"] = [[{"token_id": t, **dataclasses.asdict(lp)} for t, lp in entry.items()]
                                for entry in out.logprobs]
    return line
