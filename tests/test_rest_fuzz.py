"""The HTTP API against its own OpenAPI document (``GET /v2/openapi.json``), by a schema-driven
fuzzer (schemathesis): requests generated from the document, valid and invalid, on every
operation; every answer must be a documented status with a documented body, never a 5xx (but
a 504 for a deadline the request itself set), and the server must go on serving.

Replayable: the hypothesis profile of tests/conftest.py applies (derandomized by default: the
same requests on every run; a failure prints the blob that replays it); 25 examples per
operation, ten times that under the "long" profile."""

from __future__ import annotations

import json
import urllib.request

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 25 * settings.default.max_examples // 100  # per operation ("ci" profile: 100)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")  # OpenAPI 3.0's


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def openapi_document(base_url) -> dict:
    with urllib.request.urlopen(f"{base_url}/v2/openapi.json", timeout=30) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def rest_schema(openapi_document):
    return schemathesis.openapi.from_dict(openapi_document)


def test_every_generated_request_gets_a_documented_answer_and_no_5xx(rest_schema, base_url,
                                                                     server, openapi_document):
    # each operation by hand (not schemathesis' pytest plugin, which needs an older pytest)
    operations = [result.ok() for result in rest_schema.get_all_operations()]
    # every operation the served document declares is fuzzed, none left out
    declared = sum(method in METHODS for item in openapi_document["paths"].values()
                   for method in item)
    assert len(operations) == declared > 20

    for operation in operations:
        @given(case=operation.as_strategy(), real=st.sampled_from(["", "lenet5"]),
               version=st.sampled_from(["", "1"]))
        @settings(max_examples=EXAMPLES, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        def answered(case, real: str, version: str) -> None:
            # half the requests name a served model (and its version), so that they get past
            # the model lookup into the body's parsing
            if real and case.path_parameters and "model" in case.path_parameters:
                case.path_parameters["model"] = real
                if version and "version" in case.path_parameters:
                    case.path_parameters["version"] = version
            response = case.call(base_url=base_url, timeout=60)
            # a 5xx only for a deadline the request itself set (X-Timeout-Ms) and that passed
            own_deadline = response.status_code == 504 and "X-Timeout-Ms" in (case.headers or {})
            assert response.status_code < 500 or own_deadline, \
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
            case.validate_response(response, checks=[
                status_code_conformance, content_type_conformance,
                response_schema_conformance])

        answered()
        assert server.process.poll() is None, operation.label
