"""Fixtures the attention tests share."""

import pytest

from tritium.ops.attention import kernel


@pytest.fixture
def plans(monkeypatch) -> list:
    """The launch plan of every kernel launch during the test."""
    seen = []
    launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda plan, **kw: seen.append(plan) or launch(plan, **kw))
    return seen
