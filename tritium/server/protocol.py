"""The OpenAI wire format: pydantic models of the request bodies (strict types, ranges checked) and the error
object. Sampling fields use the engine's names, which are OpenAI's and vLLM's."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tritium.engine.sampling_params import SamplingParams

MAX_N = 16  # samples per request: each one holds a sequence in the batch
MAX_LOGPROBS = 20  # as OpenAI
MAX_STOPS = 8


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


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


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
