"""SamplingParams checks every field on construction (engine/bounds.py): a value outside what the engine and torch
take raises a ValueError naming the field, and what passes runs."""

import dataclasses
import math

import pytest
import torch

from tritium import SamplingParams
from tritium.engine.errors import InvalidParameter
from tritium.engine.sampling_params import BOUNDS, GREEDY_BELOW, MAX_LOGIT_BIAS, MAX_SAMPLES, MAX_STOP_CHARS, MAX_STOPS

BAD = [  # (field, value)
    ("n", 0), ("n", 1.5), ("n", True), ("n", MAX_SAMPLES + 1), ("n", "2"),
    ("temperature", -1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("temperature", None),
    ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan), ("top_k", -2), ("top_k", 2**31), ("top_k", 10**400),
    ("min_p", 2), ("min_p", -math.inf),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", 10**30), ("seed", 1.5), ("seed", "1"),
    ("max_tokens", 0), ("max_tokens", 2**31), ("max_tokens", 1.5),
    ("logprobs", -1), ("logprobs", 2.0), ("logprobs", 2**31),
    ("stop", 3), ("stop", ["ok", None]), ("stop", ""), ("stop", ["a", ""]), ("stop", "\ud800"),
    ("stop", ["x"] * (MAX_STOPS + 1)), ("stop", "x" * (MAX_STOP_CHARS + 1)), ("stop", {"a": 1}),
    ("stop_token_ids", [-1]), ("stop_token_ids", [2**31]), ("stop_token_ids", "abc"), ("stop_token_ids", [1.0]),
    ("stop_token_ids", list(range(2000))),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"),
    ("presence_penalty", 2.5), ("frequency_penalty", math.nan), ("repetition_penalty", 0),
    ("repetition_penalty", 1e300), ("logit_bias", {"x": 1.0}), ("logit_bias", {5: math.nan}),
    ("logit_bias", {"-3": 1.0}), ("logit_bias", {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}), ("logit_bias", [1]),
    ("min_tokens", -1), ("min_tokens", 17), ("prompt_logprobs", -1), ("prompt_logprobs", 2**31),
    ("structured_outputs", {"regex": "a+"}),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r:.20}" for n, v in BAD])
def test_a_bad_field_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=f"^{name}") as info:
        SamplingParams(**{name: value})
    assert isinstance(info.value, InvalidParameter) and info.value.param == name


def test_every_field_has_a_bound():
    assert set(BOUNDS) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_values_at_the_bounds_pass_and_seed_a_generator():
    p = SamplingParams(n=MAX_SAMPLES, temperature=0, top_k=2**31 - 1, seed=2**63 - 1, stop=["x"] * MAX_STOPS,
                       stop_token_ids=[0, 2**31 - 1], max_tokens=2**31 - 1, logprobs=0)
    assert p.stop == ("x",) * MAX_STOPS and p.stop_token_ids == (0, 2**31 - 1)
    for seed in (2**63 - 1 + MAX_SAMPLES - 1, -(2**63)):  # the last sample's stream seed, the lowest seed
        torch.Generator().manual_seed(seed)
    assert SamplingParams(logit_bias={"7": 100, 3: -100}).logit_bias == {7: 100.0, 3: -100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None and SamplingParams(min_tokens=16).min_tokens == 16
    assert SamplingParams(temperature=1).temperature == 1.0 and SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams().stop == () and SamplingParams(stop=None).stop == ()


def test_temperatures_too_small_to_divide_by_are_greedy():
    assert SamplingParams(temperature=GREEDY_BELOW / 2).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
