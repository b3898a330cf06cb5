"""Shared helpers of the engine tests: a tiny byte-level BPE tokenizer with a chat template, saved next to a model."""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tritium import LLM, SamplingParams

SENTENCES = [
    "The cat sat on the mat, and the dog sat on the log.",
    "Hello, world! 42 apples and 7 pears for the party.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9, \u65e5\u672c\u8a9e, and a smile \U0001f642 too.",
    "the quick brown fox jumps over the lazy dog",
]
SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Exercises what transformers' jinja2 set-up changes: trimmed blocks and stripped indents, raise_exception,
# bos/eos tokens, loop variables and the generation prompt.
CHAT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] != 'system' %}
<|system|>
You are terse.{{ eos_token }}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""


def save_tokenizer(path: Path, vocab_size: int = 300, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """Train a byte-level BPE tokenizer on SENTENCES; write tokenizer.json and tokenizer_config.json into `path`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tok.save(str(path / "tokenizer.json"))
    # eos as a serialised AddedToken, the other form tokenizer_config.json files use.
    config = {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True,
                                                "lstrip": False, "rstrip": False, "normalized": False}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def assert_greedy_equals_transformers(folder: Path, prompts: list[str], max_tokens: int) -> None:
    """Tritium's greedy tokens and text on a text model folder equal transformers' generate and decode (float32)."""
    llm = LLM(str(folder), dtype="float32")
    got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    for prompt, result in zip(prompts, got, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert result.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert result.outputs[0].token_ids == expected
        assert result.outputs[0].text == tok.decode(expected, skip_special_tokens=True)
