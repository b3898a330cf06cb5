"""Schemathesis against the server's own OpenAPI document: generated requests, valid and not, get no 5xx."""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.serving import running_server


def test_openapi_fuzz_finds_no_server_errors():
    with running_server(max_model_len=64) as (url, _):
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        failures, statuses = [], []
        for operation in schema.get_all_operations():
            op = operation.ok()

            @settings(max_examples=25, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def check(case):
                response = case.call_and_validate(base_url=url, checks=[not_a_server_error], timeout=30)
                statuses.append(response.status_code)

            try:
                check()
            except Exception as exc:  # noqa: BLE001  collected so every operation runs
                failures.append(f"{op.method.upper()} {op.path}: {exc}")
        assert not failures, "\n".join(failures)
        assert len(statuses) >= 50 and 200 in statuses and 400 in statuses
