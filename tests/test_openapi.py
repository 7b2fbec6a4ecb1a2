"""The OpenAPI document served at ``/medicon/v1/openapi.json``: valid OpenAPI 3.1, every ``$ref``
resolvable, and in step with the routes the gateway really registers under ``/medicon/v1`` —
``gateway.http.rest``'s and the built-in plugins' (the audit log) — and ``/metrics`` (no Kubo
needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from gateway.http import rest as api

DOC_PATH = Path(api.__file__).with_name("openapi.json")
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Served by gateway.http.app, outside the API's RouteTableDef.
OUTSIDE_API = {("GET", "/healthz"), ("GET", "/readyz")}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(DOC_PATH.read_text())


def _api_routes() -> set[tuple[str, str]]:
    """Every route of the app under the API prefix, as ``create_app`` registers them (with the
    routes of the plugins it loads), except the catch-all that answers 404."""
    from gateway.http.app import create_app
    from gateway.config import load_config
    app = create_app(load_config(env={}))
    return {(route.method.upper(), route.resource.canonical) for route in app.router.routes()
            if route.resource is not None
            and (route.resource.canonical.startswith(api.PREFIX + "/") or route.resource.canonical == "/metrics")
            and "{tail" not in route.resource.canonical and route.method != "HEAD"}


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items()
            for method in item if method in HTTP_METHODS}


def test_valid_openapi_31(doc):
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "Medicon Gateway API"
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_authentication_is_documented_on_every_operation(doc):
    """Bearer and Basic for the whole API; every operation but the health probes answers 401
    and 403 in the ``Error`` shape."""
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == schemes["bearer"] | {"type": "http", "scheme": "bearer"}
    assert schemes["basic"] == schemes["basic"] | {"type": "http", "scheme": "basic"}
    assert doc["security"] == [{"bearer": []}, {"basic": []}]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            if (method.upper(), path) in OUTSIDE_API:
                assert op["security"] == [], path
                continue
            assert "security" not in op, (method, path)
            assert op["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}, (method, path)
            assert op["responses"]["403"] == {"$ref": "#/components/responses/Forbidden"}, (method, path)


def test_every_route_is_documented_and_nothing_else(doc):
    routes = _api_routes()
    assert routes, "the app registers no API routes"
    assert {("GET", "/medicon/v1/audit"), ("GET", "/medicon/v1/audit/verify"), ("GET", "/metrics")} <= routes
    assert all(method != "*" for method, _ in routes), "a catch-all route besides {tail:.*}?"
    documented = _documented(doc)
    assert routes - documented == set(), "routes missing from gateway/http/openapi.json"
    assert documented - routes - OUTSIDE_API == set(), "operations in gateway/http/openapi.json with no route"
    assert OUTSIDE_API <= documented


def test_path_parameters_match_route_templates(doc):
    """Each path's ``{name}`` placeholders are declared as required path parameters."""
    params = doc["components"].get("parameters", {})

    def resolved(p: dict[str, Any]) -> dict[str, Any]:
        return params[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p

    for path, item in doc["paths"].items():
        names = {seg[1:-1] for seg in path.split("/") if seg.startswith("{") and seg.endswith("}")}
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            declared = [resolved(p) for p in item.get("parameters", []) + op.get("parameters", [])]
            in_path = {p["name"] for p in declared if p["in"] == "path"}
            assert in_path == names, (method, path)
            assert all(p["required"] for p in declared if p["in"] == "path"), (method, path)


def _refs(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            else:
                yield from _refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _refs(value, f"{where}/{i}")


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} is not a reference within the document"
    node: Any = doc
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(token)]
        else:
            node = node[token]
    return node


def test_every_ref_resolves(doc):
    refs = list(_refs(doc))
    assert refs
    broken = []
    for where, ref in refs:
        try:
            _resolve(doc, ref)
        except (AssertionError, KeyError, IndexError, ValueError, TypeError):
            broken.append(f"{where}: {ref}")
    assert not broken, broken


def test_every_component_is_used(doc):
    used = {ref for _, ref in _refs(doc)}
    # security schemes are used by name, in security requirements
    requirements = doc.get("security", []) + [req for item in doc["paths"].values() for op in item.values()
                                              if isinstance(op, dict) for req in op.get("security", [])]
    used |= {f"#/components/securitySchemes/{name}" for req in requirements for name in req}
    unused = [f"#/components/{kind}/{name}" for kind, entries in doc["components"].items()
              for name in entries if f"#/components/{kind}/{name}" not in used]
    assert not unused, unused
