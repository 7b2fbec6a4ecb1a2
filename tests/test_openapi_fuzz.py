"""Schemathesis against the gateway's REST API, driven by its own OpenAPI document
(``gateway/http/openapi.json``, served at ``/medicon/v1/openapi.json``).

Every operation gets schema-conforming and schema-violating requests (bodies, path and query
parameters), with the admin token, against the gateway process in front of the session's Kubo.
Each answer must not be a server error, must carry a documented status code and content type,
and must match the documented response schema (``Error`` for every 4xx).

Deterministic by default (the same requests every run); ``MEDICON_FUZZ_EXAMPLES=N`` raises the
examples per operation to N and draws fresh ones (a long "chaos" run).
"""

from __future__ import annotations

import os
from pathlib import Path

import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import CHAOS
from gateway.http import rest as api

DOC_PATH = Path(api.__file__).with_name("openapi.json")
FUZZ = os.environ.get("MEDICON_FUZZ_EXAMPLES")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]

# Loaded at import (from the file, so collection needs no server); the base URL is the gateway
# fixture's, given per call. (schemathesis.pytest.from_fixture would load it lazily, but its
# subtest reporting does not run under pytest 9.)
schema = schemathesis.openapi.from_path(DOC_PATH)
schema.config.generation.update(
    max_examples=max(20, int(FUZZ)) if FUZZ else 20,
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    deterministic=not FUZZ,
)


@schema.parametrize()
def test_api_conforms_and_never_fails_on_the_server(case, gateway):
    response = case.call(base_url=gateway.url, headers=gateway.headers, timeout=60)
    CHAOS["server_errors"] += response.status_code >= 500  # the `make chaos` summary's 5xx
    case.validate_response(response, checks=CHECKS)
