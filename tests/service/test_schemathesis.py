"""Schemathesis over the OpenAPI spec, every operation, with and without a key.

Pass criteria: no 5xx at all, and every 4xx carries the documented error body — the native
envelope `{"error": {"code", "message", "param"}}`, or OpenAI's `{"error": {"message", "type",
"param", "code"}}` on the OpenAI-compatible routes. Bounded: a fixed number of examples per
operation, derandomized, so a run takes seconds and repeats itself.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import bearer, make_key

pytestmark = pytest.mark.timeout(240)

MAX_EXAMPLES = 25
OPENAI_PREFIXES = ("/v1/files", "/v1/fine_tuning", "/v1/chat")


def error_body_problem(path: str, status: int, response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return f"{status} without a JSON body: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"{status} without an 'error' object: {body!r:.200}"
    keys = (
        ("message", "type", "param", "code")
        if path.startswith(OPENAI_PREFIXES)
        else (
            "code",
            "message",
            "param",
        )
    )
    missing = [k for k in keys if k not in error]
    if missing or not isinstance(error.get("message"), str) or not error["message"]:
        return f"{status} error body lacks {missing or 'a message'}: {error!r:.200}"
    return None


def test_fuzzed_requests_never_5xx_and_every_4xx_has_the_error_body(
    api_url: str, service_env: dict[str, str]
) -> None:
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    key = make_key(service_env, "fuzz")  # its own tenant: nothing of the others is reachable
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    cases = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20

    for operation in operations:

        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), authed=st.booleans())
        def run(case: Any, authed: bool) -> None:
            nonlocal cases
            cases += 1
            path = case.operation.path
            headers = bearer(key) if authed else {}
            response = case.call(base_url=api_url, headers=headers, timeout=30)
            statuses[response.status_code] += 1
            where = f"{case.method} {case.formatted_path} (auth={authed})"
            if response.status_code >= 500:
                failures.append(f"{where}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400 and path != "/metrics":
                problem = error_body_problem(path, response.status_code, response)
                if problem:
                    failures.append(f"{where}: {problem}")
            if not authed and path.startswith("/v1") and response.status_code != 401:
                failures.append(f"{where}: {response.status_code} without a key")

        run()

    print(
        f"\nschemathesis: {len(operations)} operations, {cases} cases, statuses {dict(statuses)}, "
        f"{len(failures)} failures"
    )
    assert not failures, "\n".join(failures[:20])
