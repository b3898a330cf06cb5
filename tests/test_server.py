"""`tritium serve` over HTTP on loopback: the openai client, batches of prompts, concurrency against offline
generation, bad batches, disconnects freeing pages and the API key (the metrics: test_metrics.py)."""

import asyncio
import json
import socket
import time
from collections import defaultdict

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import MODEL, running_server
from tritium import LLM, SamplingParams, default_model_path
from tritium.models.config import ModelConfig
from tritium.models.shapes import MODEL_SHAPES

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def server():
    with running_server(max_model_len=MAX_MODEL_LEN) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


def test_openai_client_completions_and_chat(client):
    done = client.completions.create(model=MODEL, prompt="The for statement", max_tokens=6, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.finish_reason == "length" and done.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == 6 and all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    streamed = client.completions.create(model=MODEL, prompt="The for statement", max_tokens=6, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == choice.text

    messages = [{"role": "user", "content": "Hi there"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, n=2,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    assert all(len(e.top_logprobs) == 3 for e in chat.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert client.models.list().data[0].id == MODEL


def test_a_batch_of_prompts_in_each_form_equals_the_prompts_one_by_one(server, client):
    texts = ["The for statement", "A while loop", "Hello"]
    ids = [server[1].engine.tokenizer.encode(t) for t in texts]
    args = dict(model=MODEL, max_tokens=4, temperature=0, n=2, extra_body={"ignore_eos": True})
    singles = [client.completions.create(prompt=t, **args) for t in texts]
    expected = [c.text for s in singles for c in s.choices]  # choice index = prompt index * n + sample index
    assert len(set(expected)) == 3  # greedy: the n samples agree, the prompts do not
    assert [c.text for c in client.completions.create(prompt=ids[1], **args).choices] == expected[2:4]
    for prompt in (texts, ids):
        done = client.completions.create(prompt=prompt, **args)
        assert [c.index for c in done.choices] == list(range(6)) and [c.text for c in done.choices] == expected
        assert done.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles) == sum(map(len, ids))
        assert done.usage.completion_tokens == 3 * 2 * 4


def test_a_streamed_batch_gives_each_chunk_its_choice_index(client):
    args = dict(model=MODEL, prompt=["The for statement", "A while loop"], max_tokens=6, temperature=0, n=2,
                extra_body={"ignore_eos": True})
    done = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    texts, finish = defaultdict(str), {}
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in done.choices} and len(set(texts.values())) == 2
    assert finish == dict.fromkeys(range(4), "length")
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage


def test_64_concurrent_streams_equal_offline_generation(server):
    prompts = [f"Request {i}: the while loop" + " and" * (i % 7) for i in range(64)]
    aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused")

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_of_them())
    offline = LLM(default_model_path(), max_model_len=MAX_MODEL_LEN)
    expected = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert got == [e.outputs[0].text for e in expected]


OK_COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
@pytest.mark.parametrize(("prompt", "message"), [
    ([], "prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids"),
    (["Hello", 7], "prompt.texts.1: Input should be a valid string"),
    ([[1, 2], "Hello"], "prompt.token_id_lists.1: Input should be a valid list"),
    ([[1, 2], []], "prompt.token_id_lists.1: List should have at least 1 item"),
    ([[1, 2], [3, 10**9]], "prompt 1: prompt token ids must be integers in [0, "),
    (["Hello", "word " * 400], "prompt 1: prompt ("),
])
def test_a_bad_batch_is_named_and_nothing_of_it_queued(server, prompt, message):
    url, engine = server
    body = {**OK_COMPLETION, "prompt": prompt, "max_tokens": 50, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text
    assert not engine.engine.has_unfinished()


def test_a_batch_the_engine_refuses_in_part_leaves_nothing_queued(server, monkeypatch):
    url, engine = server
    add = engine.engine.add_request

    def refuse_the_second(prompt_ids, params, request_id):
        if request_id.endswith("-1"):
            raise ValueError("refused")
        return add(prompt_ids, params, request_id)

    monkeypatch.setattr(engine.engine, "add_request", refuse_the_second)
    body = {**OK_COMPLETION, "prompt": ["Hello", "The for statement", "A while loop"], "max_tokens": 200,
            "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == "prompt 1: refused"
    assert not engine.engine.has_unfinished() and engine.engine.pages.num_free == engine.engine.pages.num_pages
    events = httpx.post(url + "/v1/completions", json={**body, "stream": True}, timeout=30).text.split("\n\n")
    assert json.loads(events[0][6:])["error"]["message"] == "prompt 1: refused" and events[1] == "data: [DONE]"
    assert not engine.engine.has_unfinished()


def test_disconnect_mid_stream_frees_the_pages_at_once(server):
    url, engine = server
    pages = engine.engine.pages
    idle = pages.num_pages
    body = {**OK_COMPLETION, "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 2}
    waits, steps = [], []
    for _ in range(5):
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            next(events)
            before = time.monotonic()
            next(events)
            steps.append(time.monotonic() - before)  # about one engine step
            assert pages.num_free < idle
        left = time.monotonic()
        while pages.num_free != idle and time.monotonic() < left + 10:
            time.sleep(0.001)
        waits.append(time.monotonic() - left)
        assert pages.num_free == idle and not engine.engine.has_unfinished()
    # The pages come back once the step in flight ends: within 0.05 s, or a step where a step is slower (a busy
    # machine); medians of five.
    assert sorted(waits)[2] < max(0.05, 1.5 * sorted(steps)[2]), (waits, steps)


@pytest.mark.parametrize(("path", "body", "prompts"), [
    ("/v1/completions", {**OK_COMPLETION, "prompt": ["Hello", "The for statement"]}, 2),
    ("/v1/chat/completions", OK_CHAT, 1),
])
def test_disconnect_before_a_whole_response_aborts_the_request(server, path, body, prompts):
    url, engine = server
    pages = engine.engine.pages
    idle = pages.num_pages
    aborts = "vllm:request_success_total" + str([("finished_reason", "abort"), ("model_name", MODEL)])
    before = _metrics(url).get(aborts, 0)
    data = json.dumps({**body, "max_tokens": 200, "ignore_eos": True, "n": 2}).encode()
    with socket.create_connection(("127.0.0.1", httpx.URL(url).port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
                  f"content-length: {len(data)}\r\n\r\n".encode() + data)
        deadline = time.monotonic() + 10
        while pages.num_free == idle:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.01)
    deadline = time.monotonic() + 10  # the abort counter tells an abort from a request that ran to its end
    aborted = prompts * 2  # every sample is a request to the metrics, as in vLLM
    while (pages.num_free != idle or _metrics(url).get(aborts, 0) < before + aborted) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pages.num_free == idle and not engine.engine.has_unfinished()
    assert _metrics(url).get(aborts, 0) == before + aborted


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name + str(sorted(s.labels.items())) if s.labels else s.name): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_api_key_is_required_on_v1():
    with running_server(api_key="s3cret", max_model_len=MAX_MODEL_LEN) as (url, _):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = httpx.post(url + "/v1/completions", json=OK_COMPLETION, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret")
        assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_random_weights_in_a_model_shape_served_with_another_folders_tokenizer():
    """What an H100 serving benchmark of a large model's shape uses: random weights, the default model's tokenizer."""
    raw = {**MODEL_SHAPES["llama-3.2-1b"], "torch_dtype": "float32", "num_hidden_layers": 1, "vocab_size": 4096,
           "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
    with running_server(model=ModelConfig.from_dict(raw), name="tiny-shape", tokenizer=default_model_path(),
                        block_size=4, max_model_len=64) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["tiny-shape"]
        done = client.completions.create(model="tiny-shape", prompt="The for statement", max_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("args", "message"), [
    (["some/folder", "--model-config", "qwen3-0.6b"], "give MODEL or --model-config NAME, not both"),
    (["some/folder", "--model", "other/folder"], "give the model as MODEL or as --model, not both"),
    (["--model-config", "gpt-9"], "unknown model shape 'gpt-9'"),
])
def test_serve_model_choice_errors(args, message, capsys):
    from tritium.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
