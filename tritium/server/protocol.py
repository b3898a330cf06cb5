"""The OpenAI wire format: pydantic models of the request bodies (strict types, ranges checked) and the error
object. Sampling fields use the engine's names, which are OpenAI's and vLLM's."""

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from tritium.engine.sampling_params import SamplingParams

MAX_N = 16  # samples per request: each one holds a sequence in the batch
MAX_LOGPROBS = 20  # as OpenAI
MAX_STOPS = 8
MAX_PROMPTS = 256  # prompts in one completions request: each is a request in the engine, with n sequences


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True)
    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    # Unset (or null) sampling fields take the model's generation_config.json defaults, then SamplingParams' own.
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: all tokens
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: int | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict) -> SamplingParams:
        """The request's SamplingParams; `defaults` (the model's) fill the sampling fields it leaves unset."""
        given = {name: v for name in ("temperature", "top_p", "min_p") if (v := getattr(self, name)) is not None}
        if self.top_k is not None:
            given["top_k"] = max(self.top_k, 0)
        return SamplingParams(**{**defaults, **given}, n=self.n, seed=self.seed, max_tokens=max_tokens,
                              stop=self.stop, ignore_eos=self.ignore_eos, logprobs=logprobs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


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
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    def prompt_ids(self, encode: Callable[[str], list[int]]) -> list[list[int]]:
        """Each prompt's token ids, in order; texts go through `encode`."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [encode(p) if isinstance(p, str) else p for p in ([self.prompt] if one else self.prompt)]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: what the context leaves
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
