"""The plugin host: a third-party plugin, installed the way a pip package is, is found through
the ``medicon_gateway`` entry-point group and its schema folder and rules are enforced."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest

from conftest import app_client, gateway_config
from gateway.http.app import create_app
from records_helpers import encounter, opened, uid

VACCINATION = "https://hospital.example/schemas/vaccination/v1"


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """Write a package and its ``.dist-info`` (with ``entry_points.txt``) into a site folder on
    sys.path: exactly what ``pip install`` leaves behind."""
    site = tmp_path / "site"
    pkg = site / "hospital_rules"
    (pkg / "schemas").mkdir(parents=True)
    (pkg / "schemas" / "vaccination-v1.json").write_text(json.dumps({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": VACCINATION,
        "$ref": "https://medicon.example/schemas/envelope/v1",
        "properties": {
            "schema": {"const": VACCINATION},
            "prev": {"type": "string"},
            "body": {"type": "object", "required": ["vaccine", "dose"],
                     "properties": {"vaccine": {"type": "string"}, "dose": {"type": "integer", "minimum": 1}},
                     "additionalProperties": False},
        },
    }))
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from pathlib import Path
        from gateway.hookspecs import hookimpl

        @hookimpl
        def medicon_schema_dirs():
            return [Path(__file__).parent / "schemas"]

        @hookimpl
        async def medicon_validate_record(record, schema_id):
            notes = record.get("body", {}).get("notes", "")
            if "SSN" in notes:
                return [("/body/notes", "must not carry a social security number")]
            return []
    '''))
    dist = site / "hospital_rules-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hospital-rules\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[medicon_gateway]\nhospital_rules = hospital_rules\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("hospital_rules", None)


async def test_installed_plugin_adds_schemas_and_rules(installed_plugin, aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    listed = {p["name"]: p for p in (await (await c.get("/medicon/v1/plugins")).json())["plugins"]}
    assert listed["hospital_rules"]["version"] == "1.2.3"
    assert set(listed["hospital_rules"]["hooks"]) == {"medicon_schema_dirs", "medicon_validate_record"}
    assert "chain_policy" in listed  # the built-in, found the same way
    assert VACCINATION in (await (await c.get("/medicon/v1/schemas")).json())["kinds"]

    patient, episode = uid("p"), uid("e")
    assert (await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))).status == 201
    vac = {"schema": VACCINATION, "patient": patient, "episode": episode, "author": "nurse",
           "body": {"vaccine": "MMR", "dose": 1}}
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=vac)
    assert r.status == 201, await r.text()
    vac["body"]["dose"] = 0
    r = await c.post(f"/medicon/v1/episodes/{episode}/records", json=vac)
    assert r.status == 400
    assert any("/body/dose" in p and VACCINATION in p for p in (await r.json())["error"]["problems"])

    r = await c.post(f"/medicon/v1/episodes/{episode}/records",
                     json=encounter(patient, episode, note="SSN 123-45-6789"))
    assert r.status == 400
    problems = (await r.json())["error"]["problems"]
    assert problems == ["/body/notes: must not carry a social security number (plugin hospital_rules)"]
    length = (await (await c.get(f"/medicon/v1/episodes/{episode}")).json())["length"]
    assert length == 2  # the rejected records never moved the head


async def test_without_the_plugin_its_kind_is_unknown(aiohttp_client, kubo):
    c = await app_client(aiohttp_client, gateway_config(kubo))
    assert VACCINATION not in (await (await c.get("/medicon/v1/schemas")).json())["kinds"]


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    (tmp_path / "broken_rules.py").write_text(textwrap.dedent('''
        from gateway.hookspecs import hookimpl

        @hookimpl
        def medicon_validate_record(record):
            raise RuntimeError("database password is hunter2")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "broken_rules"
    sys.modules.pop("broken_rules", None)


async def test_plugin_from_config_and_its_failure_is_a_clean_error(broken_plugin, aiohttp_client, kubo):
    cfg = gateway_config(kubo, **{"plugins.modules": [broken_plugin]})
    c = await app_client(aiohttp_client, cfg)
    patient, episode = uid("p"), uid("e")
    r = await c.post(f"/medicon/v1/patients/{patient}/episodes", json=opened(patient, episode))
    assert r.status == 500
    message = (await r.json())["error"]["message"]
    assert "broken_rules" in message and "medicon_validate_record" in message
    assert "hunter2" not in message


async def test_unknown_chain_policy_fails_at_start(aiohttp_client, kubo):
    from gateway.config import ConfigError
    with pytest.raises(ConfigError, match="records.chain_policy.*'sloppy'"):
        await app_client(aiohttp_client, gateway_config(kubo, **{"records.chain_policy": "sloppy"}))
