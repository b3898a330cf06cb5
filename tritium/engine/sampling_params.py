"""How to pick each next token, how many samples to draw, what to report and when to stop (vLLM's names)."""

import json
from dataclasses import dataclass, field, fields

from tritium.engine.bounds import INT32_MAX, INT64_MAX, INT64_MIN, Bool, Float, Instance, Int, Ints, Strings, TokenMap

MAX_SAMPLES = 1024  # n: each sample is a sequence the engine holds
MAX_STOPS = 64
MAX_STOP_CHARS = 1024  # every stop string is searched for in each step's new text
MAX_STOP_TOKEN_IDS = 1024
MAX_ABS_PENALTY = 2.0  # presence and frequency penalties, as OpenAI and vLLM bound them
MAX_REPETITION_PENALTY = 100.0
MAX_ABS_BIAS = 100.0  # logit_bias values, as OpenAI bounds them
MAX_LOGIT_BIAS = 1024  # logit_bias entries: each is a scatter into the logits at every step
# Temperatures below this sample greedily (vLLM's threshold too): dividing float32 logits by less overflows them.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's StructuredOutputsParams): exactly one of a JSON schema (`json`, a dict or
    its text), any JSON object (`json_object`), a regular expression (`regex`), one of a list of strings (`choice`)
    or an EBNF grammar (`grammar`, GBNF as llama.cpp writes it)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object is True:
            given.append("json_object")
        elif self.json_object is not False:
            raise ValueError(f"structured_outputs.json_object must be True or False, got {self.json_object!r}")
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))

    def key(self) -> tuple[str, str]:
        """(kind, text): what the grammar is compiled from; equal keys compile to the same grammar."""
        if self.json is not None:
            return "json", json.dumps(self.json)
        if self.json_object:
            return "json_object", ""
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        return ("regex", self.regex) if self.regex is not None else ("grammar", self.grammar)


@dataclass(frozen=True)
class SamplingParams:
    """Every field is checked on construction by its entry in BOUNDS (below); a bad one raises InvalidParameter, a
    ValueError naming it."""

    n: int = 1  # independent samples of each prompt
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # sample k of a request draws from the stream seeded with seed + k
    # Penalties (vLLM's semantics, applied to the logits before temperature and filters, greedy rows too):
    # presence subtracts its value from each token generated so far, frequency its value times the count;
    # repetition divides positive logits (multiplies negative ones) of every token in the prompt or the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    max_tokens: int | None = 16  # None: up to the context (max_model_len)
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are blocked, stop strings unchecked, until then
    stop: str | list[str] | tuple[str, ...] | None = None  # kept as a tuple
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # k: each generated token's logprob and the k most likely alternatives
    prompt_logprobs: int | None = None  # k: each prompt token's logprob (after the first) and the top k
    structured_outputs: StructuredOutputsParams | None = None  # what the output must match

    def __post_init__(self) -> None:
        if self.top_k == -1:  # vLLM's 'all tokens', as 0
            object.__setattr__(self, "top_k", 0)
        for f in fields(self):
            object.__setattr__(self, f.name, BOUNDS[f.name].check(f.name, getattr(self, f.name)))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            Int(0, self.max_tokens).check("min_tokens", self.min_tokens)  # raises, naming the bound

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether a penalty needs the counts of the tokens seen so far."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


# What each field may hold, whatever the caller: within the C types torch converts it to, finite, bounded. A new
# field adds its line here (the engine's own checks, against the vocabulary and max_model_len, come on top).
BOUNDS = {
    "n": Int(1, MAX_SAMPLES),
    "temperature": Float(0),
    "top_k": Int(0, INT32_MAX),
    "top_p": Float(0, 1, lo_open=True),
    "min_p": Float(0, 1),
    "seed": Int(INT64_MIN, INT64_MAX, optional=True),
    "presence_penalty": Float(-MAX_ABS_PENALTY, MAX_ABS_PENALTY),
    "frequency_penalty": Float(-MAX_ABS_PENALTY, MAX_ABS_PENALTY),
    "repetition_penalty": Float(0, MAX_REPETITION_PENALTY, lo_open=True),
    "logit_bias": TokenMap(INT32_MAX, Float(-MAX_ABS_BIAS, MAX_ABS_BIAS), MAX_LOGIT_BIAS),
    "max_tokens": Int(1, INT32_MAX, optional=True),
    "min_tokens": Int(0, INT32_MAX),
    "stop": Strings(MAX_STOPS, MAX_STOP_CHARS),
    "stop_token_ids": Ints(0, INT32_MAX, MAX_STOP_TOKEN_IDS),
    "include_stop_str_in_output": Bool(),
    "ignore_eos": Bool(),
    "logprobs": Int(0, INT32_MAX, optional=True),
    "prompt_logprobs": Int(0, INT32_MAX, optional=True),
    "structured_outputs": Instance(StructuredOutputsParams),
}
