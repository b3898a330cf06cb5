"""The hostile battery: requests a hostile client sends, all fired while innocent streams run. Each gets OpenAI's
error object with its 4xx code naming the field (or, for values that are odd but valid, a proper answer); the
innocent streams end exactly as they do without the battery; nothing is left in the engine."""

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest

from tests.serving import MODEL, running_server
from tritium.engine.sampling_params import MAX_STOP_CHARS
from tritium.server.protocol import MAX_MESSAGES, MAX_NAME_CHARS, MAX_PROMPTS

MAX_MODEL_LEN = 256
C, H = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_H = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
LONE = "\ud800"  # a lone surrogate: valid JSON ("\ud800"), not valid Unicode


def raw(fields: str, path_body: dict = OK_C) -> bytes:
    """A body as bytes: the OK body with raw JSON `fields` spliced in (NaN, Infinity, huge literals ...)."""
    return json.dumps(path_body).encode()[:-1] + b", " + fields.encode() + b"}"


HOSTILE = [  # (class, path, body (bytes go as they are), status, param (the error's, or its start) or None)
    # Integers past the C types the engine converts them to: torch refused them, inside the batched step.
    ("int overflow", C, {**OK_C, "seed": 2**64}, 400, "seed"),
    ("int overflow", C, {**OK_C, "seed": 2**63}, 400, "seed"),
    ("int overflow", C, {**OK_C, "seed": -(2**63) - 1}, 400, "seed"),
    ("int overflow", C, {**OK_C, "seed": 10**30, "stream": True}, 400, "seed"),
    ("int overflow", H, {**OK_H, "seed": 2**64 - 1, "n": 2}, 400, "seed"),
    ("int overflow", C, {**OK_C, "top_k": 10**400}, 400, "top_k"),
    ("int overflow", C, {**OK_C, "top_k": 2**31}, 400, "top_k"),
    ("int overflow", C, {**OK_C, "max_tokens": 2**63}, 400, "max_tokens"),
    ("int overflow", H, {**OK_H, "max_completion_tokens": 2**70}, 400, "max_completion_tokens"),
    ("int overflow", C, {**OK_C, "prompt": [1, 2**64]}, 400, "prompt"),
    ("int overflow", C, {**OK_C, "n": 2**64}, 400, "n"),
    ("int overflow", H, {**OK_H, "logprobs": True, "top_logprobs": 2**64}, 400, "top_logprobs"),
    ("int overflow", C, raw('"seed": ' + "9" * 5000), 400, None),  # past Python's digit limit for int()
    # Floats that are not finite (Python's JSON reader takes NaN and Infinity).
    ("non-finite float", C, raw('"temperature": NaN'), 400, "temperature"),
    ("non-finite float", C, raw('"temperature": Infinity'), 400, "temperature"),
    ("non-finite float", C, raw('"temperature": 1e999'), 400, "temperature"),
    ("non-finite float", C, raw('"top_p": NaN'), 400, "top_p"),
    ("non-finite float", C, raw('"min_p": -Infinity'), 400, "min_p"),
    ("non-finite float", H, raw('"temperature": NaN', OK_H), 400, "temperature"),
    # Token ids outside the vocabulary.
    ("token id outside vocabulary", C, {**OK_C, "prompt": [4096]}, 400, "prompt"),
    ("token id outside vocabulary", C, {**OK_C, "prompt": [1, 10**9]}, 400, "prompt"),
    ("token id outside vocabulary", C, {**OK_C, "prompt": [-1]}, 400, "prompt"),
    ("token id outside vocabulary", C, {**OK_C, "prompt": [[1, 2], [3, 10**6]]}, 400, "prompt"),
    # Text that is valid JSON but not valid Unicode, in every string a body can carry.
    ("invalid unicode", C, {**OK_C, "prompt": LONE}, 400, "prompt"),
    ("invalid unicode", C, {**OK_C, "prompt": ["ok", "a" + LONE]}, 400, "prompt.1"),
    ("invalid unicode", C, {**OK_C, "stop": LONE}, 400, "stop"),
    ("invalid unicode", C, {**OK_C, "stop": ["x", LONE]}, 400, "stop.1"),
    ("invalid unicode", C, {**OK_C, "user": LONE}, 400, "user"),
    ("invalid unicode", C, {**OK_C, "model": LONE}, 400, "model"),
    ("invalid unicode", C, {**OK_C, "unknown_field": ["x", {"y": LONE}]}, 400, "unknown_field.1.y"),
    ("invalid unicode", C, {**OK_C, LONE: 1}, 400, "body"),
    ("invalid unicode", H, {**OK_H, "messages": [{"role": "user", "content": LONE}]}, 400, "messages.0.content"),
    ("invalid unicode", H, {**OK_H, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     400, "messages.0.content.0.text"),
    ("invalid unicode", H, {**OK_H, "messages": [{"role": LONE, "content": "hi"}]}, 400, "messages.0.role"),
    ("invalid unicode", H, {**OK_H, "user": LONE, "stream": True}, 400, "user"),
    ("invalid unicode", H, {**OK_H, "stop": [LONE]}, 400, "stop.0"),
    ("invalid unicode", C, b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}', 400, None),
    ("invalid unicode", H, b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xc3"}]}',
     400, None),
    # Lists and strings past their bounds.
    ("unbounded list or string", C, {**OK_C, "stop": ["a"] * 100}, 400, "stop"),
    ("unbounded list or string", C, {**OK_C, "stop": "x" * (MAX_STOP_CHARS + 1)}, 400, "stop"),
    ("unbounded list or string", C, {**OK_C, "stop": ["x" * (MAX_STOP_CHARS + 1)]}, 400, "stop"),
    ("unbounded list or string", C, {**OK_C, "prompt": ["Hello"] * (MAX_PROMPTS + 1)}, 400, "prompt"),
    ("unbounded list or string", C, {**OK_C, "n": 1000}, 400, "n"),
    ("unbounded list or string", C, {**OK_C, "logprobs": 50}, 400, "logprobs"),
    ("unbounded list or string", C, {**OK_C, "model": "m" * (MAX_NAME_CHARS + 1)}, 400, "model"),
    ("unbounded list or string", C, {**OK_C, "user": "u" * (MAX_NAME_CHARS + 1)}, 400, "user"),
    ("unbounded list or string", H, {**OK_H, "messages": [{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)},
     400, "messages"),
    ("unbounded list or string", C, {**OK_C, "prompt": "x" * (2 << 20)}, 413, None),
    ("unbounded list or string", C, b"[" * 100_000, 400, None),
    # Lengths against max_model_len.
    ("past max_model_len", C, {**OK_C, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("past max_model_len", C, {**OK_C, "prompt": "word " * 400}, 400, "max_tokens"),
    ("past max_model_len", C, {**OK_C, "prompt": ["Hello", "word " * 400]}, 400, "max_tokens"),
    ("past max_model_len", H, {**OK_H, "messages": [{"role": "user", "content": "word " * 400}], "max_tokens": None},
     400, "messages"),
    ("past max_model_len", H, {**OK_H, "max_tokens": 10**6}, 400, "max_tokens"),
    # Values that are odd but valid: each gets a proper answer.
    ("odd but valid", C, {**OK_C, "temperature": 1e-40}, 200, None),
    ("odd but valid", C, {**OK_C, "temperature": 5e-324, "top_p": 0.5}, 200, None),
    ("odd but valid", C, {**OK_C, "top_p": 1e-300}, 200, None),
    ("odd but valid", C, {**OK_C, "min_p": 5e-324, "top_k": 2**31 - 1}, 200, None),
    ("odd but valid", C, {**OK_C, "seed": 2**63 - 1, "n": 16, "temperature": 1.5}, 200, None),
    ("odd but valid", C, {**OK_C, "seed": -(2**63), "logprobs": 20}, 200, None),
    ("odd but valid", C, {**OK_C, "stop": ["x" * MAX_STOP_CHARS] * 8}, 200, None),
    ("odd but valid", C, {**OK_C, "prompt": [0, 4095]}, 200, None),
    ("odd but valid", H, {**OK_H, "messages": [{"role": "user", "content": "\U0001f600\u200b\x00"}]}, 200, None),
    ("odd but valid", C, {"prompt": "Hello", "max_tokens": 2}, 200, None),  # no model: the served one
    ("odd but valid", C, {**OK_C, "logit_bias": {str(t): -100 for t in range(1024)}, "min_tokens": 2}, 200, None),
    ("odd but valid", C, {**OK_C, "repetition_penalty": 100, "presence_penalty": -2, "frequency_penalty": 2,
                          "prompt_logprobs": 20, "echo": True, "logprobs": 20}, 200, None),
    ("odd but valid", H, {**OK_H, "structured_outputs": {"regex": "[a-z]{1,8}"}, "max_tokens": 4}, 200, None),
    # What held before: malformed bodies, wrong types, unknown names, out-of-range values.
    ("malformed or mistyped", C, b"{not json", 400, None),
    ("malformed or mistyped", C, b"[1, 2]", 400, None),
    ("malformed or mistyped", C, b"", 400, None),
    ("malformed or mistyped", C, raw("") + b"\x00", 400, None),
    ("malformed or mistyped", C, {**OK_C, "model": "gpt-4"}, 404, "model"),
    ("malformed or mistyped", H, {**OK_H, "model": "nope"}, 404, "model"),
    ("malformed or mistyped", C, {"model": MODEL}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "prompt": ""}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "prompt": []}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "prompt": 42}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "prompt": ["Hello", 1]}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "prompt": [[1, 2], "Hello"]}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "prompt": [[1, 2], []]}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "prompt": [None]}, 400, "prompt"),
    ("malformed or mistyped", C, {**OK_C, "max_tokens": "5"}, 400, "max_tokens"),
    ("malformed or mistyped", C, {**OK_C, "max_tokens": 0}, 400, "max_tokens"),
    ("malformed or mistyped", C, {**OK_C, "temperature": -0.5}, 400, "temperature"),
    ("malformed or mistyped", C, {**OK_C, "temperature": "hot"}, 400, "temperature"),
    ("malformed or mistyped", C, {**OK_C, "top_p": 0}, 400, "top_p"),
    ("malformed or mistyped", C, {**OK_C, "top_k": -5}, 400, "top_k"),
    ("malformed or mistyped", C, {**OK_C, "min_p": 1.5}, 400, "min_p"),
    ("malformed or mistyped", C, {**OK_C, "n": 0}, 400, "n"),
    ("malformed or mistyped", C, {**OK_C, "n": True}, 400, "n"),
    ("malformed or mistyped", C, {**OK_C, "stop": ""}, 400, "stop"),
    ("malformed or mistyped", C, {**OK_C, "stop": 7}, 400, "stop"),
    ("malformed or mistyped", C, {**OK_C, "stream": "yes"}, 400, "stream"),
    ("malformed or mistyped", C, {**OK_C, "seed": 1.5}, 400, "seed"),
    ("malformed or mistyped", C, {**OK_C, "stream_options": {"include_usage": 1}}, 400, "stream_options"),
    ("malformed or mistyped", H, {**OK_H, "messages": []}, 400, "messages"),
    ("malformed or mistyped", H, {**OK_H, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("malformed or mistyped", H, {**OK_H, "messages": [{"role": "user"}]}, 400, "messages"),
    ("malformed or mistyped", H, {**OK_H, "messages": "Hello"}, 400, "messages"),
    ("malformed or mistyped", H, {**OK_H, "logprobs": 3}, 400, "logprobs"),
    ("malformed or mistyped", H, {**OK_H, "top_logprobs": 2}, 400, "top_logprobs"),
    ("malformed or mistyped", H, {**OK_H, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ("malformed or mistyped", H, {**OK_H, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("malformed or mistyped", "/v1/nowhere", OK_C, 404, None),
    # The other OpenAI and vLLM fields: honoured within their ranges, or refused by name (never ignored).
    ("field refused or out of range", C, {**OK_C, "best_of": 3}, 400, "best_of"),
    ("field refused or out of range", C, {**OK_C, "use_beam_search": True}, 400, "use_beam_search"),
    ("field refused or out of range", C, {**OK_C, "suffix": "!"}, 400, "suffix"),
    ("field refused or out of range", C, {**OK_C, "skip_special_tokens": False}, 400, "skip_special_tokens"),
    ("field refused or out of range", C, {**OK_C, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("field refused or out of range", C, {**OK_C, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("field refused or out of range", C, {**OK_C, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("field refused or out of range", C, raw('"repetition_penalty": NaN'), 400, "repetition_penalty"),
    ("field refused or out of range", C, {**OK_C, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("field refused or out of range", C, raw('"logit_bias": {"5": Infinity}'), 400, "logit_bias"),
    ("field refused or out of range", C, {**OK_C, "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ("field refused or out of range", C, {**OK_C, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("field refused or out of range", C, {**OK_C, "logit_bias": {str(2**64): 1}}, 400, "logit_bias"),
    ("field refused or out of range", C, {**OK_C, "logit_bias": {str(t): 1 for t in range(1025)}}, 400,
     "logit_bias"),
    ("field refused or out of range", C, {**OK_C, "min_tokens": 5}, 400, "min_tokens"),
    ("field refused or out of range", C, {**OK_C, "min_tokens": -1}, 400, "min_tokens"),
    ("field refused or out of range", C, {**OK_C, "min_tokens": 2**40}, 400, "min_tokens"),
    ("field refused or out of range", C, {**OK_C, "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("field refused or out of range", C, {**OK_C, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("field refused or out of range", C, {**OK_C, "stop_token_ids": [2**40]}, 400, "stop_token_ids"),
    ("field refused or out of range", C, {**OK_C, "stop_token_ids": [5000]}, 400, "stop_token_ids"),
    ("field refused or out of range", C, {**OK_C, "stop_token_ids": [1] * 1025}, 400, "stop_token_ids"),
    ("field refused or out of range", C, {**OK_C, "guided_regex": "(unclosed"}, 400, None),
    ("field refused or out of range", C, {**OK_C, "guided_regex": "a" + LONE}, 400, "guided_regex"),
    ("field refused or out of range", C, {**OK_C, "guided_choice": []}, 400, None),
    ("field refused or out of range", C, {**OK_C, "guided_json": {"type": "object"}, "guided_regex": "a+"}, 400,
     None),
    ("field refused or out of range", H, {**OK_H, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("field refused or out of range", H, {**OK_H, "response_format": {"type": "json_schema"}}, 400, None),
    ("field refused or out of range", H, {**OK_H, "tool_choice": "required"}, 400, "tool_choice"),
    ("field refused or out of range", H, {**OK_H, "tools": [{"type": "function", "function": {"name": "f"}}],
                                          "tool_choice": "auto"}, 400, "tool_choice"),
    ("field refused or out of range", H, {**OK_H, "tools": [{"type": "function", "function": {"name": "f"}}],
                                          "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400,
     "tool_choice"),
    ("field refused or out of range", H, {**OK_H, "tools": [{"type": "function", "function": {
        "name": "f", "description": LONE}}]}, 400, "tools.0.function.description"),
    ("field refused or out of range", H, {**OK_H, "echo": True}, 400, "echo"),
]

INNOCENTS = [{**OK_C, "prompt": p, "max_tokens": 160, "ignore_eos": True, "stream": True, **sampling}
             for p, sampling in [("The for statement", {"temperature": 0}), ("A while loop", {"temperature": 0}),
                                 ("import os", {"temperature": 0.8, "seed": 3}),
                                 ("Hello", {"temperature": 1.0, "top_k": 40, "seed": 5})]]


@pytest.fixture(scope="module")
def server():
    with running_server(max_model_len=MAX_MODEL_LEN) as running:
        yield running


async def _stream(client: httpx.AsyncClient, url: str, body: dict, started: asyncio.Event) -> tuple[str, float]:
    """An innocent stream's text, and when it ended; `started` is set at its first chunk."""
    text, events = "", []
    async with client.stream("POST", url + C, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    assert events[-1] == "[DONE]", events[-3:]
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]  # an error event has no choices: this fails
        text += choice["text"]
    assert choice["finish_reason"] == "length"
    return text, time.monotonic()


async def _innocents(url: str, then=None) -> tuple[list, list]:
    """The innocent streams, run together; `then()` runs once each has its first chunk, before they end."""
    async with httpx.AsyncClient(timeout=120) as client:
        started = [asyncio.Event() for _ in INNOCENTS]
        streams = [asyncio.create_task(_stream(client, url, b, s)) for b, s in zip(INNOCENTS, started)]
        for event in started:
            await event.wait()
        meanwhile = await then(client) if then else []
        return [await s for s in streams], meanwhile


async def _battery(client: httpx.AsyncClient, url: str) -> list[tuple[httpx.Response, float]]:
    gate = asyncio.Semaphore(8)

    async def one(path: str, body) -> tuple[httpx.Response, float]:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with gate:
            r = await client.post(url + path, content=content, headers={"content-type": "application/json"})
            return r, time.monotonic()

    return await asyncio.gather(*(one(path, body) for _, path, body, _, _ in HOSTILE))


def test_the_hostile_battery_gets_error_objects_and_hurts_no_request_in_flight(server):
    url, engine = server
    together, _ = asyncio.run(_innocents(url))
    beside_battery, answers = asyncio.run(_innocents(url, lambda client: _battery(client, url)))
    wrong = []
    for (kind, path, body, status, param), (r, _) in zip(HOSTILE, answers):
        case = f"{kind}: {path} {str(body)[:100]} -> {r.status_code} {r.text[:200]}"
        if r.status_code != status:
            wrong.append(case)
        elif status == 200:
            choices = r.json()["choices"]
            if not choices or any(c["finish_reason"] not in ("stop", "length") for c in choices):
                wrong.append(case)
        else:
            error = r.json()["error"]
            if set(error) != {"message", "type", "param", "code"} or not error["message"] or (
                    param is not None and not (error["param"] or "").startswith(param)):
                wrong.append(case)
    assert not wrong, "\n".join(wrong)
    assert [t for t, _ in beside_battery] == [t for t, _ in together]  # innocent streams untouched
    assert min(end for _, end in beside_battery) > max(at for _, at in answers)  # ... and in flight throughout
    assert not engine.engine.has_unfinished() and engine.engine.pages.num_free == engine.engine.pages.num_pages
    assert len(HOSTILE) >= 60 and len(Counter(kind for kind, *_ in HOSTILE)) == 9


def test_a_tiny_temperature_samples_greedily(server):
    url = server[0]
    answers = [httpx.post(url + C, json={**OK_C, "prompt": "The for statement", "max_tokens": 8, "ignore_eos": True,
                                         "temperature": t}, timeout=60).json()["choices"][0]["text"]
               for t in (0, 1e-30, 5e-324)]
    assert answers[0] == answers[1] == answers[2]
