"""The OpenAI wire format: pydantic models of the request bodies (strict types, ranges checked) and the error
object. Sampling fields use the engine's names, which are OpenAI's and vLLM's. Every OpenAI and vLLM sampling
field is either honoured or, set to anything but its neutral value, refused with a 400 naming it (NOT_SUPPORTED);
fields that are neither (OpenAI's `store`, `metadata` ...) are ignored.

Every field is bounded: integers within the C types the engine converts them to (engine/bounds.py), floats finite
(NaN and Infinity, which Python's JSON reader takes, are refused), lists and strings to a length; and every string in
a body, unknown fields' too, must be valid Unicode. The engine checks again what depends on the model (vocabulary,
max_model_len)."""

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from tritium.engine.bounds import INT32_MAX, INT64_MAX, INT64_MIN, check_unicode
from tritium.engine.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    StructuredOutputsParams,
)

MAX_N = 16  # samples per request: each one holds a sequence in the batch
MAX_LOGPROBS = 20  # as OpenAI
MAX_STOPS = 8
MAX_PROMPTS = 256  # prompts in one completions request: each is a request in the engine, with n sequences
MAX_MESSAGES = 1024  # messages in a conversation, text parts in a message, tools in a request
MAX_NAME_CHARS = 256  # model, user and function names

# OpenAI's and vLLM's fields that Tritium does not implement, with the values that ask for nothing (a client may
# send those): any other value is refused with a 400 naming the field.
NOT_SUPPORTED = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "bad_words": ([],), "allowed_token_ids": (),
    "truncate_prompt_tokens": (), "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
    "logits_processors": ([],), "return_tokens_as_token_ids": (False,), "guided_whitespace_pattern": (),
    "guided_decoding_backend": ("xgrammar", "auto"), "structural_tag": (), "priority": (0,),
    "suffix": ("",), "functions": ([],), "function_call": ("none",), "chat_template": (),
    "chat_template_kwargs": ({},), "documents": ([],), "continue_final_message": (False,), "prediction": (),
    "audio": (), "modalities": (["text"],), "mm_processor_kwargs": ({},), "cache_salt": (), "vllm_xargs": ({},),
    "echo": (False,),  # chat's (vLLM: the reply begins with the last message); completions' echo is honoured
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class StructuredOutputsBody(_Strict):
    """vLLM's `structured_outputs` object; the engine checks that exactly one is given."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(max_length=MAX_MESSAGES)] | None = None
    grammar: str | None = None
    json_object: bool = False

    def params(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(json=self.json_, regex=self.regex, choice=self.choice, grammar=self.grammar,
                                       json_object=self.json_object)


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Sampling(_Strict):
    """Fields shared by completions and chat. Unknown fields are kept aside: those in NOT_SUPPORTED are refused by
    `refused()`, the others ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    model: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None  # None: the served model
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # only = n: every sample is returned
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=100)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],  # token id (as text) -> bias
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] = 0
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(max_length=MAX_MESSAGES)] | None = None
    guided_grammar: str | None = None
    # Unset (or null) sampling fields take the model's generation_config.json defaults, then SamplingParams' own.
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None  # -1 or 0: all tokens
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: Annotated[Annotated[StopText, Tag("text")] | Annotated[list[StopText], Field(max_length=MAX_STOPS),
                                                                 Tag("list")],
                    Discriminator(lambda v: "text" if isinstance(v, str) else "list")] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The end user, for the caller's own tracking (as OpenAI and vLLM take it): checked, never used to generate.
    user: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, body: object) -> object:
        _check_strings(body, "")
        return body

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict,
                        structured: StructuredOutputsParams | None = None, prompt_logprobs: int | None = None,
                        ) -> SamplingParams:
        """The request's SamplingParams; `defaults` (the model's) fill the sampling fields it leaves unset."""
        given = {name: v for name in ("temperature", "top_p", "min_p") if (v := getattr(self, name)) is not None}
        if self.top_k is not None:
            given["top_k"] = max(self.top_k, 0)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if (value := getattr(self, name)) is not None:
                given[name] = value
        return SamplingParams(**{**defaults, **given}, n=self.n, seed=self.seed, max_tokens=max_tokens,
                              min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids or (),
                              include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
                              logit_bias=self.logit_bias, logprobs=logprobs,
                              prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
                              structured_outputs=structured or self.structured())

    def refused(self) -> tuple[str, str] | None:
        """(field, why) for the first field this server does not implement that the request sets, else None."""
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", f"best_of ({self.best_of}) other than n ({self.n}) is not supported: every sample is " \
                              "returned, so ask for n samples"
        for name, value in (self.model_extra or {}).items():
            if name in NOT_SUPPORTED and value is not None and value not in NOT_SUPPORTED[name]:
                return name, f"{name} is not supported by this server"
        return None

    def structured(self) -> StructuredOutputsParams | None:
        """What the output must match, from whichever of the structured-output fields is set (ValueError when
        several are: the error names them)."""
        given = {}
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema is not None else None
            if fmt.type == "json_schema" and fmt.json_schema is None:
                raise ValueError("response_format of type json_schema needs its json_schema object")
            given["response_format"] = (StructuredOutputsParams(json=schema) if schema is not None
                                        else StructuredOutputsParams(json_object=True))
        if self.structured_outputs is not None:
            given["structured_outputs"] = self.structured_outputs.params()
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if (value := getattr(self, name)) is not None:
                given[name] = StructuredOutputsParams(**{kind: value})
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}: each says what the whole output must match")
        return next(iter(given.values()), None)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def _prompt_form(prompt: object) -> str | None:
    """Which of the four prompt forms a value claims to be (by its first item), so that a bad one is told what is
    wrong in that form rather than in all four."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, list) and prompt:
        return {str: "texts", int: "token_ids", list: "token_id_lists"}.get(type(prompt[0]))
    return None


class CompletionRequest(_Sampling):
    # One prompt or a batch (OpenAI's four forms); each prompt is its own request in the engine.
    prompt: Annotated[
        Annotated[Text, Tag("text")] | Annotated[TokenIds, Tag("token_ids")]
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS), Tag("texts")]
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("token_id_lists")],
        Discriminator(_prompt_form, custom_error_type="prompt_form", custom_error_message=(
            "must be a string, a list of strings, a list of token ids or a list of lists of token ids, not empty"))]
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False  # the prompt's text before each choice's (and with logprobs, its tokens' logprobs)

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as given, in order: its text, or its token ids."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)

    def prompt_ids(self, encode: Callable[[str], list[int]]) -> list[list[int]]:
        """Each prompt's token ids, in order; texts go through `encode`."""
        return [encode(p) if isinstance(p, str) else p for p in self.prompts()]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None  # None: what the context leaves
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_MESSAGES)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # "required" may call several tools; a named choice calls one
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes the special tokens

    def forced_tool(self) -> tuple[str, StructuredOutputsParams] | None:
        """("named" or "required", the JSON schema the reply must match) when tool_choice forces a call; None when
        the reply is text. ValueError naming tool_choice or tools when they do not fit together."""
        choice = self.tool_choice
        if choice is None or choice == "none":
            return None
        if not self.tools:
            raise ValueError("tool_choice forces a tool call, but the request gives no tools")
        if choice == "auto":
            raise ValueError('tool_choice "auto" needs a tool-call parser, which this server does not have: use '
                             '"required", a named function or "none"')
        schemas = {t.function.name: t.function.parameters or {"type": "object", "properties": {}}
                   for t in self.tools}
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in schemas:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                 f"({', '.join(schemas)})")
            return "named", StructuredOutputsParams(json=schemas[choice.function.name])
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                           "required": ["name", "parameters"]} for name, schema in schemas.items()]}
        array = {"type": "array", "items": call, "minItems": 1}
        if not self.parallel_tool_calls:
            array["maxItems"] = 1
        return "required", StructuredOutputsParams(json=array)


def _check_strings(value: object, where: str) -> None:
    """Raise InvalidParameter naming the first string (a value or a key) in a parsed JSON body that is not valid
    Unicode (a lone surrogate, from a \\ud800 escape: the tokenizer and the UTF-8 encoder refuse it)."""
    if isinstance(value, str):
        check_unicode(where or "body", value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, where or "body")
            _check_strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{where}.{i}")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An answer with OpenAI's error object and an HTTP status (the app's handler sends it)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)
