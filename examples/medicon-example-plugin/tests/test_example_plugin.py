"""The example plugin, installed with pip and found by the gateway through its entry point:
its record kind and house rules, its route (authorized like the gateway's own), its webhook."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from importlib.metadata import entry_points

import pytest
import requests

from conftest import WEBHOOK_SECRET
from medicon_example_plugin import NAME, SIGNATURE_HEADER, WOUND

OPENED = "https://medicon.example/schemas/episode-opened/v1"
ENCOUNTER = "https://medicon.example/schemas/encounter/v1"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Client:
    def __init__(self, gateway, token: str | None) -> None:
        self.base = gateway.url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str) -> requests.Response:
        return requests.get(self.base + path, headers=self.headers, timeout=30)

    def post(self, path: str, doc: dict) -> requests.Response:
        return requests.post(self.base + path, json=doc, headers=self.headers, timeout=30)


@pytest.fixture
def admin(gateway) -> Client:
    return Client(gateway, gateway.token)


def open_episode(admin: Client) -> tuple[str, str]:
    patient, episode = uid("p"), uid("e")
    r = admin.post(f"/medicon/v1/patients/{patient}/episodes",
                   {"episode": episode, "author": "nurse.a",
                    "body": {"type": "wound-care", "managingOrganization": "st-example"}})
    assert r.status_code == 201, r.text
    return patient, episode


def wound(**body) -> dict:
    return {"schema": WOUND, "author": "nurse.a",
            "body": {"site": "sacrum", "length_mm": 30, "width_mm": 20, "stage": 2, **body}}


def test_loaded_through_its_entry_point(admin):
    assert NAME in {ep.name for ep in entry_points(group="medicon_gateway")}  # pip installed it
    listed = {p["name"]: p for p in admin.get("/medicon/v1/plugins").json()["plugins"]}
    assert listed[NAME]["version"] == "0.1.0"
    assert set(listed[NAME]["hooks"]) == {"medicon_schema_dirs", "medicon_validate_record", "medicon_register_routes",
                                          "medicon_startup", "medicon_shutdown", "medicon_record_committed"}
    assert WOUND in admin.get("/medicon/v1/schemas").json()["kinds"]


def test_schema_and_house_rules(admin):
    _, episode = open_episode(admin)
    records = f"/medicon/v1/episodes/{episode}/records"
    assert admin.post(records, wound()).status_code == 201

    r = admin.post(records, wound(stage=5))  # the schema: stages 1 to 4
    assert r.status_code == 400
    assert any("/body/stage" in p for p in r.json()["error"]["problems"])

    r = admin.post(records, wound(length_mm=10, width_mm=25))
    assert r.status_code == 400
    assert r.json()["error"]["problems"] == [
        f"/body/width_mm: must not exceed length_mm: length is the longest dimension (WC-12) (plugin {NAME})"]

    r = admin.post(records, wound(stage=4))
    assert r.status_code == 400
    assert any("/body/surgical_review" in p and NAME in p for p in r.json()["error"]["problems"])
    r = admin.post(records, wound(stage=4, surgical_review={"requested": True, "by": "dr.cut"}))
    assert r.status_code == 201, r.text

    assert admin.get(f"/medicon/v1/episodes/{episode}").json()["length"] == 3  # refusals never moved the head


def test_route_summarises_an_episodes_wounds_within_scope(gateway, admin):
    patient, episode = open_episode(admin)
    records = f"/medicon/v1/episodes/{episode}/records"
    for body in ({"stage": 2, "length_mm": 40, "width_mm": 30}, {"stage": 3, "length_mm": 45, "width_mm": 30},
                 {"site": "heel-left", "stage": 1, "length_mm": 10.5, "width_mm": 5}):
        assert admin.post(records, wound(**body)).status_code == 201
    assert admin.post(records, {"schema": ENCOUNTER, "author": "nurse.a",
                                "body": {"class": "nursing", "notes": "dressing changed"}}).status_code == 201
    route = f"/medicon/example/v1/episodes/{episode}/wounds"

    r = admin.get(route)
    assert r.status_code == 200, r.text
    wounds = r.json()["wounds"]
    assert [(w["seq"], w["site"], w["stage"], w["area_mm2"], w["worse"]) for w in wounds] == [
        (1, "sacrum", 2, 1200, False), (2, "sacrum", 3, 1350, True), (3, "heel-left", 1, 52.5, False)]

    own = Client(gateway, gateway.token_for(uid("nurse"), "clinician", "--patient", patient))
    assert own.get(route).status_code == 200
    other = Client(gateway, gateway.token_for(uid("nurse"), "clinician", "--patient", uid("p")))
    assert other.get(route).status_code == 404  # out of scope: not found, as the gateway's own routes
    assert Client(gateway, None).get(route).status_code == 401
    assert Client(gateway, gateway.token_for(uid("prom"), "monitor")).get(route).status_code == 403
    assert admin.get(f"/medicon/example/v1/episodes/{uid('e')}/wounds").status_code == 404


def test_webhook_announces_committed_wound_assessments(admin, receiver):
    patient, episode = open_episode(admin)
    records = f"/medicon/v1/episodes/{episode}/records"
    before = len(receiver.deliveries())
    assert admin.post(records, {"schema": ENCOUNTER, "author": "nurse.a", "body": {"class": "nursing"}}).status_code == 201
    r = admin.post(records, wound(stage=3))
    assert r.status_code == 201
    cid = r.json()["cid"]

    deadline = time.monotonic() + 10
    while len(receiver.deliveries()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    new = receiver.deliveries()[before:]
    assert len(new) == 1, new  # the wound assessment, not the encounter nor the episode's opening
    headers, body = new[0]
    expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    event = json.loads(body)
    assert event == {"event": "wound-assessment.committed", "cid": cid, "seq": 2, "stage": 3,
                     "recorded_at": event["recorded_at"]}
    assert patient.encode() not in body and episode.encode() not in body
    assert admin.get(f"/medicon/v1/records/{cid}").json()["record"]["body"]["stage"] == 3  # what the receiver does next
