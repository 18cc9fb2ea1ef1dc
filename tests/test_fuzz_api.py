"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document.

A real `jobq api` process on a real database. Schemathesis generates requests for every
operation, valid ones and invalid ones, and checks every answer: never a 5xx, status codes,
content types, headers and bodies as documented, invalid data rejected, valid data accepted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jobq.queue.validation import NOT_PRINTABLE
from tests.helpers import ROOT

# Per operation and generation mode; 8 operations give well over 1,000 requests.
POSITIVE_EXAMPLES = 200
NEGATIVE_EXAMPLES = 100
MIN_REQUESTS = 1000

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api_url(dsn: str) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": dsn, "JOBQ_LOG_LEVEL": "ERROR", "PYTHONPATH": str(ROOT)}
    env.pop("JOBQ_API_TOKENS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobq", "api", "--port", str(port),
         "--app", "jobq.examples:registry"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the API did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def _documented_rejection(case: Any, response: Any) -> bool:
    """Schema-valid requests the API rightly refuses: data the schema cannot describe."""
    if response.status_code != 422:
        return False
    problem = response.json()
    # A job of POST /jobs/batch is located as the job of POST /jobs, with its index.
    errors = [
        {**e, "loc": ["body", *e["loc"][3:]]}
        if e.get("loc", [])[:2] == ["body", "jobs"] and len(e["loc"]) > 2
        else e
        for e in problem.get("errors") or []
    ]
    if any(e.get("loc") == ["query", "until"] and e.get("type") == "missing_wait" for e in errors):
        return True  # until without wait: a dependency between parameters
    if problem.get("error") == "idempotency_key_reused":
        return True  # two generated requests shared a key: the contract's 422
    if ["query", "cursor"] in [e.get("loc") for e in errors]:
        return True  # an opaque cursor the API never issued
    if any(e.get("loc") == ["body", "payload"] and "NUL" in e.get("msg", "") for e in errors):
        return True  # \u0000 somewhere in the payload: Postgres jsonb cannot store it
    if problem.get("error") == "number_out_of_range":
        return True  # a number no 64-bit integer or double holds, anywhere in an open payload
    if any(
        (e.get("loc") or [None])[-1] == "unique_for"
        and any(
            said in e.get("msg", "")
            for said in ("idempotency key", "is required with", "not in a batch")
        )
        for e in errors
    ):
        # A unique job with an idempotency key (header or body), unique_by/unique_states
        # without unique_for, or a unique job in POST /jobs/batch (whose items share the
        # schema of POST /jobs): rules the schema does not state.
        return True
    # Names must be printable, and run_at a real instant within years 1-9999 in UTC: JSON
    # Schema cannot say "printable" in full, nor bound a date-time or its calendar.
    return bool(errors) and all(
        (
            e.get("loc") in (["body", "kind"], ["body", "queue"], ["path", "name"], ["body", "by"])
            and e.get("msg") == NOT_PRINTABLE
        )
        or (
            e.get("loc") == ["body", "run_at"]
            and any(
                said in e.get("msg", "")
                for said in ("9999-12-31", "leap second", "impossible offset", "not a valid date")
            )
        )
        for e in errors
    )


POSITIVE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
]
NEGATIVE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _has_parameters(operation: Any) -> bool:
    return bool(list(operation.iter_parameters())) or (
        operation.body is not None and bool(list(operation.body))
    )


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    checks: list[Any],
    api_url: str,
    session: requests.Session,
) -> int:
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        nonlocal sent
        response = case.call(base_url=api_url, session=session)
        sent += 1
        used = checks
        if _documented_rejection(case, response):
            used = [c for c in checks if c is not positive_data_acceptance]
        case.validate_response(response, checks=used)

    run()
    return sent


def test_generated_requests_to_every_operation_get_documented_answers_and_no_5xx(
    api_url: str,
) -> None:
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    session = requests.Session()
    sent = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        modes = [(GenerationMode.POSITIVE, POSITIVE_EXAMPLES, POSITIVE_CHECKS)]
        if _has_parameters(operation):
            modes.append((GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, NEGATIVE_CHECKS))
        for mode, examples, checks in modes:
            sent += _fuzz(operation, mode, examples, checks, api_url, session)
    print(f"schemathesis sent {sent} requests")
    assert sent >= MIN_REQUESTS
