"""Structured output: every output of the demo model matches what it was asked to (JSON schemas judged by the
jsonschema package, regexes by `re`), with decodes launched ahead, preemption, and rows of every other kind in
the same batch."""

import json
import re
import time

import jsonschema
import pytest

from tritium import LLM, SamplingParams, default_model_path
from tritium.engine.sampling_params import StructuredOutputsParams

# Short outputs with bounded fields: a 7M-parameter model may never close an unbounded string or number, and an
# output cut by max_tokens cannot parse, whatever the grammar did.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"enum": ["for", "while", "if"]},
                                      "depth": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["kind", "depth"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "maxItems": 2}}, "required": ["tags"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "maximum": 99, "minimum": 0}, "y": {"type": "integer", "maximum": 99, "minimum": 0}},
        "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}},
     "required": ["value"]},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 1, "maxLength": 5},
                                      "count": {"type": "integer", "minimum": 1, "maximum": 3}},
     "required": ["word", "count"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def demo():
    return LLM(default_model_path())


def test_200_sampled_outputs_all_validate(demo):
    """The issue's target: 200 outputs of the demo model (10 schemas x 20 samples, sampled at temperature 1),
    each parses as JSON and validates against its schema."""
    started = time.perf_counter()
    params = [SamplingParams(n=20, seed=i, temperature=1.0, max_tokens=48,
                             structured_outputs=StructuredOutputsParams(json=s)) for i, s in enumerate(SCHEMAS)]
    outs = demo.generate([f"Record {i}:" for i in range(len(SCHEMAS))], params, use_tqdm=False)
    valid = 0
    for request, schema in zip(outs, SCHEMAS):
        for out in request.outputs:
            jsonschema.validate(json.loads(out.text), schema)
            assert out.finish_reason == "stop"
            valid += 1
    assert valid == 200
    print(f"200/200 valid in {time.perf_counter() - started:.1f} s")


def test_regex_choice_and_grammar(demo):
    choices = ["yes", 'say "no"', "back\\slash", "caf\u00e9"]
    specs = [(StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
             (StructuredOutputsParams(choice=choices), lambda t: t in choices),
             (StructuredOutputsParams(grammar='root ::= "(" [a-c]+ ")"'), lambda t: re.fullmatch(r"\([a-c]+\)", t)),
             (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict))]
    params = [SamplingParams(n=8, seed=3, temperature=1.0, max_tokens=32, structured_outputs=s) for s, _ in specs]
    outs = demo.generate(["The for statement"] * len(specs), params, use_tqdm=False)
    for request, (_, ok) in zip(outs, specs):
        assert all(ok(o.text) for o in request.outputs), [o.text for o in request.outputs]
    assert len({o.text for o in outs[0].outputs}) > 1  # it did sample, not only take the top token


def test_grammar_survives_preemption_and_mixed_batches():
    """Greedy structured rows next to free and penalized ones, with so few pages that sequences are preempted and
    recomputed: the same outputs as with room to spare, each valid."""
    schema = SCHEMAS[0]
    params = [SamplingParams(temperature=0, max_tokens=26, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0, max_tokens=26, ignore_eos=True, frequency_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=26, structured_outputs=StructuredOutputsParams(
                  regex=r"(ab|cd){2,12}"))]
    prompts = ["The for statement", "A class definition", "The while loop"]
    results = []
    for pages in (None, 8):
        llm = LLM(default_model_path(), block_size=4, num_kv_pages=pages, max_model_len=32)
        results.append([r.outputs[0].text for r in llm.generate(prompts, params, use_tqdm=False)])
        if pages:
            assert llm.engine.scheduler.num_preemptions > 0
    assert results[0] == results[1]
    jsonschema.validate(json.loads(results[0][0]), schema)
    assert re.fullmatch(r"(ab|cd){2,12}", results[0][2])


def test_a_decode_launched_ahead_defers_its_sampling_to_the_host(demo):
    """The next decode's forward is queued, but it samples only after the matcher has taken the last token."""
    engine = demo.engine
    spec = StructuredOutputsParams(regex=r"x{20}")
    (seq,) = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=20, structured_outputs=spec))
    deferred = 0
    while engine.has_unfinished():
        engine.step()
        ahead = engine.runner.ahead
        deferred += ahead is not None and ahead._deferred is not None
    assert deferred > 10 and demo.engine.tokenizer.decode(seq.output_ids) == "x" * 20


@pytest.mark.parametrize(("spec", "match"), [
    (StructuredOutputsParams(regex="(unclosed"), "structured_outputs.regex"),
    (StructuredOutputsParams(json={"type": "no-such-type"}), "structured_outputs.json"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "structured_outputs.grammar")])
def test_a_spec_that_does_not_compile_is_named(demo, spec, match):
    with pytest.raises(ValueError, match=match):
        demo.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert not demo.engine.has_unfinished()


def test_spec_checks():
    for kwargs, match in (({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                          ({"json": "{not json"}, "not valid JSON"), ({"json": [1]}, "JSON schema object"),
                          ({"choice": []}, "choice"), ({"choice": ["a", ""]}, "choice"), ({"regex": ""}, "regex"),
                          ({"json_object": 1}, "json_object")):
        with pytest.raises(ValueError, match=match):
            StructuredOutputsParams(**kwargs)
    assert StructuredOutputsParams(json='{"type": "object"}').json == {"type": "object"}


def test_a_sequence_that_ends_before_its_deferred_sampling_gives_its_rows_back(demo):
    """A stop string ends one sequence while the decode launched ahead for it waits to sample: the sampling that
    runs later leaves no penalty row behind."""
    engine = demo.engine
    spec = StructuredOutputsParams(regex=r"(ab)+")
    stopped = SamplingParams(temperature=0.5, seed=1, max_tokens=12, stop="abab", frequency_penalty=0.5,
                             structured_outputs=spec)
    longer = SamplingParams(temperature=0.5, seed=2, max_tokens=12, frequency_penalty=0.5, structured_outputs=spec)
    outs = demo.generate(["x", "y"], [stopped, longer], use_tqdm=False)
    assert outs[0].outputs[0].text == "" and outs[0].outputs[0].stop_reason == "abab"
    assert len(outs[1].outputs[0].token_ids) > len(outs[0].outputs[0].token_ids)
    assert engine.runner.processors.penalties.row_of == {} and engine.runner.generators == {}
