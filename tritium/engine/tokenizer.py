"""Text <-> token ids for a Hugging Face folder: tokenizer.json, tokenizer_config.json and the chat template.

Encoding follows transformers 5: tokenizer.json's post-processor alone decides which special tokens a text gets
(transformers ignores `add_bos_token` in tokenizer_config.json whenever tokenizer.json exists). Chat templates
render in a sandboxed jinja2 environment set up as transformers sets it up, so a conversation gives the same
prompt here as there.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tritium.engine.bounds import check_unicode

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Prompt tokens decoded ahead of the first output token, so that it decodes as a continuation of the prompt
# (some decoders drop a leading space at the start of a text).
PROMPT_CONTEXT = 5


class Tokenizer:
    """A model folder's tokenizer: `encode`, `decode` and `apply_chat_template`."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer missing: {model_dir} has no tokenizer.json (Tritium reads the fast "
                             "tokenizer's file). Give another folder (--tokenizer, tokenizer=) or none "
                             "(--skip-tokenizer-init, skip_tokenizer_init=True: token ids in and out)")
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        config = _read_json(model_dir / "tokenizer_config.json")
        fallback = _read_json(model_dir / "special_tokens_map.json")
        self.special_tokens = {name: text for name in SPECIAL_TOKENS
                               if (text := _token_text(config.get(name, fallback.get(name)))) is not None}
        eos = self.special_tokens.get("eos_token")
        self.eos_token_id = None if eos is None else self._tokenizer.token_to_id(eos)
        template_file = model_dir / "chat_template.jinja"  # transformers 5 saves the template here; it takes priority
        self.chat_template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                              else _default_template(config.get("chat_template")))
        self._compiled: jinja2.Template | None = None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The `tokenizers` object underneath (what grammar libraries read the vocabulary from)."""
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_unicode("text", text)  # the tokenizer would raise TypeError on a lone surrogate
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The prompt text of one conversation ([{"role": ..., "content": ...}, ...]) under the model's template;
        `tools` (OpenAI's tool definitions) go to templates that render them, as transformers passes them."""
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                             "or chat_template.jinja); use generate() with a formatted prompt")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("a conversation is a list of {'role': ..., 'content': ...} dicts")
        for i, message in enumerate(messages):
            for key, value in message.items():
                if isinstance(value, str):
                    check_unicode(f"messages[{i}].{key}", value)
        if self._compiled is None:
            self._compiled = _environment().from_string(self.chat_template)
        # As transformers does: keys set to None are left out, so templates can test `is defined`.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                         **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template rejected the conversation: {e}") from e


class IncrementalDetokenizer:
    """Output ids -> text, one token at a time: each call returns only the new text that is stable.

    The last few ids are decoded twice, without and with the new token, and the difference is the new text: a
    token's text can depend on its neighbours (byte-level pieces of one character, a dropped leading space).
    Text ending in U+FFFD is an unfinished UTF-8 character and is held back until a later token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0  # ids[prefix:read] is the context whose text has been emitted already
        self.read = len(self.ids)

    def _pending(self) -> str:
        context = self.tokenizer.decode(self.ids[self.prefix:self.read])
        full = self.tokenizer.decode(self.ids[self.prefix:])
        return full[len(context):]

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        new = self._pending()
        if not new or new.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        """The text held back so far (at the end of a sequence, an unfinished character stays as U+FFFD)."""
        new = self._pending()
        self.prefix, self.read = self.read, len(self.ids)
        return new


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: str | dict | None) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a serialised AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _default_template(value: str | list | None) -> str | None:
    """tokenizer_config.json holds one template, or a list of named ones of which "default" is used."""
    if isinstance(value, list):
        return next((t["template"] for t in value if t.get("name") == "default"), None)
    return value


def _environment() -> ImmutableSandboxedEnvironment:
    """jinja2 as transformers configures it for chat templates: sandboxed, trimmed blocks, its helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # jinja2's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env
