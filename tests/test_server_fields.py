"""The request fields over HTTP: each one honoured as the engine honours it offline (penalties, logit_bias,
min_tokens, stop ids, echo, prompt logprobs), structured output through every door (response_format, guided_*,
structured_outputs, tool_choice answered as tool_calls), and `model` left out."""

import json

import httpx
import jsonschema
import openai
import pytest

from tests.serving import MODEL, running_server
from tritium import LLM, SamplingParams, default_model_path

MAX_MODEL_LEN = 256
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["name", "n"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["a"]}}}]


@pytest.fixture(scope="module")
def server():
    with running_server(max_model_len=MAX_MODEL_LEN) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def offline():
    return LLM(default_model_path(), max_model_len=MAX_MODEL_LEN)


def complete(server, **body) -> dict:
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": "The for statement", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_sampling_fields_equal_offline_generation(server, offline):
    """Penalties, logit_bias, min_tokens and stop ids give over HTTP what SamplingParams gives offline; no model
    named means the served one."""
    fields = {"temperature": 0, "max_tokens": 12, "presence_penalty": 0.8, "frequency_penalty": 0.6,
              "repetition_penalty": 1.3, "logit_bias": {"11": 3.5}, "min_tokens": 4, "stop_token_ids": [42]}
    got = complete(server, **fields)
    assert got["model"] == MODEL
    params = SamplingParams(**{**fields, "logit_bias": {11: 3.5}})
    expected = offline.generate("The for statement", params, use_tqdm=False)[0].outputs[0]
    assert got["choices"][0]["text"] == expected.text
    plain = complete(server, temperature=0, max_tokens=12)["choices"][0]["text"]
    assert plain != expected.text  # the fields did change the output


def test_echo_and_prompt_logprobs(server, offline):
    got = complete(server, temperature=0, max_tokens=3, echo=True, logprobs=2, prompt_logprobs=1)
    choice = got["choices"][0]
    ids = offline.engine.tokenizer.encode("The for statement")
    assert choice["text"].startswith("The for statement") and len(choice["text"]) > len("The for statement")
    lps = choice["logprobs"]
    assert len(lps["tokens"]) == len(ids) + 3 and lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert "".join(lps["tokens"]) == choice["text"] and lps["text_offset"][len(ids)] == len("The for statement")
    expected = offline.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1),
                                use_tqdm=False)[0].prompt_logprobs
    prompt = choice["prompt_logprobs"]
    assert prompt[0] is None and len(prompt) == len(ids)
    for token, entry, want in zip(ids[1:], prompt[1:], expected[1:]):
        assert entry[str(token)]["logprob"] == pytest.approx(want[token].logprob, abs=1e-4)
        assert entry[str(token)]["rank"] == want[token].rank and "decoded_token" in entry[str(token)]
        assert lps["token_logprobs"][ids.index(token, 1)] is not None
    streamed = httpx.post(server[0] + "/v1/completions", json={"prompt": "The for statement", "max_tokens": 3,
                                                               "temperature": 0, "echo": True, "stream": True})
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in streamed.text.splitlines()
             if line.startswith("data: {")]
    assert "".join(texts) == choice["text"]


@pytest.mark.parametrize("door", ["response_format", "guided_json", "structured_outputs"])
def test_json_schema_through_every_door(server, door):
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "rec", "schema": SCHEMA}},
            "guided_json": SCHEMA, "structured_outputs": {"json": SCHEMA}}[door]
    got = complete(server, n=4, temperature=1.0, seed=2, max_tokens=40, **{door: body})
    for choice in got["choices"]:
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)


def test_json_object_regex_and_choice(client, server):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give JSON"}],
                                          response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    assert all(isinstance(json.loads(c.message.content), dict) for c in chat.choices)
    regex = complete(server, guided_regex="[0-9]{2}:[0-9]{2}", n=3, seed=1, max_tokens=10)
    assert all(len(c["text"]) == 5 and c["text"][2] == ":" for c in regex["choices"])
    choice = complete(server, guided_choice=["while", "for"], n=3, seed=1, max_tokens=10)
    assert all(c["text"] in ("while", "for") for c in choice["choices"])


def test_tool_choice_named_and_required(client):
    messages = [{"role": "user", "content": "What is the weather?"}]
    named = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    assert named.choices[0].message.content is None and named.choices[0].finish_reason == "stop"
    required = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=80, n=3,
                                              seed=4, tool_choice="required", parallel_tool_calls=False)
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=40,
                                                 stream=True, tool_choice={"type": "function",
                                                                           "function": {"name": "add"}}))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "add" and calls[0][0].index == 0
    assert 0 <= json.loads(calls[0][0].function.arguments)["a"] <= 9


def test_chat_prompt_logprobs_and_user(client):
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          user="someone", extra_body={"prompt_logprobs": 0})
    prompt = chat.model_extra["prompt_logprobs"]
    assert prompt[0] is None and all(len(entry) == 1 for entry in prompt[1:])
