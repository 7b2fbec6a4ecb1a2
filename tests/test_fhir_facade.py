"""The FHIR R4 facade (/fhir/r4) driven by real FHIR client libraries — fhirpy and fhirclient
(SMART on FHIR's) from PyPI — against a real gateway process: transaction Bundle ingest, read,
vread, search (patient, code, date with ge/le, status, _count and next links), $everything,
_history (an amendment is a version; entered-in-error), refusals, scopes, attachments by
Attachment.url, and what the search index holds and loses with crypto-shredding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal

import pytest
import requests
from fhirclient import client as fhirclient_client
from fhirclient.models.bundle import Bundle as FcBundle
from fhirclient.models.observation import Observation as FcObservation
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

from conftest import app_client, bearer, gateway_config, make_token, start_gateway, storage_env, store_sql
from gateway.core import exactjson
from gateway.core.check import check_service
from gateway.core.fhir_facade import FhirFacade
from gateway.core.fhir_validation import validate_resource
from gateway.http.appkeys import SERVICE
from records_helpers import uid

LOINC = "http://loinc.org"
FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def gateway(kubo):
    gw = start_gateway(kubo)
    yield gw
    assert gw.stop() == 0


def fhir_base(gateway) -> str:
    return gateway.url + "/fhir/r4"


def fhirpy(gateway, token: str | None = None) -> SyncFHIRClient:
    return SyncFHIRClient(fhir_base(gateway), authorization=f"Bearer {token or gateway.token}")


def post_bundle(gateway, text: str, token: str | None = None, **headers: str) -> requests.Response:
    return requests.post(fhir_base(gateway), data=text.encode(), timeout=60,
                         headers={**bearer(token or gateway.token), "Content-Type": FHIR_JSON, **headers})


def get(gateway, path: str, token: str | None = None, **params) -> requests.Response:
    return requests.get(fhir_base(gateway) + path, params=params, headers=bearer(token or gateway.token), timeout=60)


def observation(oid: str, patient: str, encounter: str, value: str, when: str, status: str = "final") -> str:
    """An HbA1c Observation as a FHIR system writes it (value text as given: 7.10 keeps its zero)."""
    return ('{"resourceType": "Observation", "id": "%s", "status": "%s",\n'
            '  "code": {"coding": [{"system": "%s", "code": "4548-4", "display": "Hemoglobin A1c"}]},\n'
            '  "subject": {"reference": "Patient/%s"}, "encounter": {"reference": "%s"},\n'
            '  "effectiveDateTime": "%s", "valueQuantity": {"value": %s, "unit": "%%", '
            '"system": "http://unitsofmeasure.org", "code": "%%"}}') % (oid, status, LOINC, patient, encounter, when,
                                                                       value)


def entry(resource: str, method: str, url: str, full_url: str | None = None) -> str:
    head = f'"fullUrl": "{full_url}", ' if full_url else ""
    return '{%s"resource": %s, "request": {"method": "%s", "url": "%s"}}' % (head, resource, method, url)


def transaction(*entries: str) -> str:
    return '{"resourceType": "Bundle", "type": "transaction", "entry": [\n' + ",\n".join(entries) + "\n]}"


@pytest.fixture(scope="module")
def diabetes(gateway):
    """A patient, an episode opened by transaction (EpisodeOfCare, a Condition created by POST
    and named by urn:uuid, the Patient), then two encounters with HbA1c results, a
    MedicationRequest and a DiagnosticReport."""
    p = uid("p")
    eoc, enc1, enc2 = f"eoc-{p}", f"enc1-{p}", f"enc2-{p}"
    cond_urn = f"urn:uuid:{uuid.uuid4()}"
    texts = {
        "patient": '{"resourceType": "Patient", "id": "%s", "gender": "female", "birthDate": "1961-07"}' % p,
        "eoc": ('{"resourceType": "EpisodeOfCare", "id": "%s", "status": "active", "patient": {"reference": '
                '"Patient/%s"}, "diagnosis": [{"condition": {"reference": "%s"}, "rank": 1}], '
                '"period": {"start": "2024-01-10"}}') % (eoc, p, cond_urn),
        "condition": ('{"resourceType": "Condition", "code": {"coding": [{"system": "http://snomed.info/sct", '
                      '"code": "44054006"}]}, "subject": {"reference": "Patient/%s"}}') % p,
        "enc1": ('{"resourceType": "Encounter", "id": "%s", "status": "finished", "class": {"system": '
                 '"http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}, "subject": {"reference": '
                 '"Patient/%s"}, "episodeOfCare": [{"reference": "EpisodeOfCare/%s"}], "period": {"start": '
                 '"2024-03-05T08:00:00+01:00"}}') % (enc1, p, eoc),
        "obs1": observation(f"a1c-1-{p}", p, f"Encounter/{enc1}", "7.10", "2024-03-05T08:30:00+01:00"),
    }
    opened = post_bundle(gateway, transaction(
        entry(texts["patient"], "PUT", f"Patient/{p}"),
        entry(texts["eoc"], "PUT", f"EpisodeOfCare/{eoc}"),
        entry(texts["condition"], "POST", "Condition", cond_urn),
        entry(texts["enc1"], "PUT", f"Encounter/{enc1}"),
        entry(texts["obs1"], "PUT", f"Observation/a1c-1-{p}")))
    assert opened.status_code == 200, opened.text
    texts.update({
        "enc2": texts["enc1"].replace(enc1, enc2).replace("2024-03-05T08:00:00", "2024-09-10T08:00:00"),
        "obs2": observation(f"a1c-2-{p}", p, f"Encounter/{enc2}", "6.80", "2024-09-10T08:30:00+01:00"),
        "glucose": observation(f"glu-{p}", p, f"Encounter/{enc2}", "128", "2024-09-10T08:30:00+01:00").replace(
            "4548-4", "2345-7").replace('"%"', '"mg/dL"'),
        "mr": ('{"resourceType": "MedicationRequest", "id": "mr-%s", "status": "active", "intent": "order", '
               '"medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", '
               '"code": "860975"}]}, "subject": {"reference": "Patient/%s"}, "encounter": {"reference": '
               '"Encounter/%s"}, "authoredOn": "2024-09-10"}') % (p, p, enc2),
        "dr": ('{"resourceType": "DiagnosticReport", "id": "dr-%s", "status": "final", "code": {"text": "Diabetes '
               'panel"}, "subject": {"reference": "Patient/%s"}, "encounter": {"reference": "Encounter/%s"}, '
               '"effectiveDateTime": "2024-09-10", "result": [{"reference": "Observation/a1c-2-%s"}]}') % (p, p, enc2, p),
    })
    second = post_bundle(gateway, transaction(
        entry(texts["enc2"], "PUT", f"Encounter/{enc2}"),
        entry(texts["obs2"], "PUT", f"Observation/a1c-2-{p}"),
        entry(texts["glucose"], "PUT", f"Observation/glu-{p}"),
        entry(texts["mr"], "PUT", f"MedicationRequest/mr-{p}"),
        entry(texts["dr"], "PUT", f"DiagnosticReport/dr-{p}")))
    assert second.status_code == 200, second.text
    return {"patient": p, "eoc": eoc, "enc1": enc1, "enc2": enc2, "texts": texts, "opened": opened.json(),
            "condition_urn": cond_urn}


def test_the_transaction_answer_and_the_records_it_made(gateway, diabetes):
    answer = diabetes["opened"]
    assert answer["resourceType"] == "Bundle" and answer["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created"] * 5
    locations = [e["response"]["location"] for e in answer["entry"]]
    assert locations[0] == f"Patient/{diabetes['patient']}/_history/1"
    condition_id = locations[2].split("/")[1]
    assert locations[2] == f"Condition/{condition_id}/_history/1"
    # the records: an opening (EpisodeOfCare, then the Patient and Condition in entry order) and
    # encounters, in the episode
    r = requests.get(f"{gateway.url}/medicon/v1/episodes/{diabetes['eoc']}/history", headers=gateway.headers,
                     timeout=30)
    records = [rec["record"] for rec in r.json()["records"]]
    assert [rec["schema"].rsplit("/", 2)[1] for rec in records] == ["episode-opened", "encounter", "encounter"]
    assert [f["resourceType"] for f in records[0]["body"]["fhir"]] == ["EpisodeOfCare", "Patient", "Condition"]
    assert records[0]["patient"] == diabetes["patient"]


def test_reads_are_the_bytes_sent(gateway, diabetes):
    p, texts = diabetes["patient"], diabetes["texts"]
    for key, path in (("obs1", f"/Observation/a1c-1-{p}"), ("enc1", f"/Encounter/{diabetes['enc1']}"),
                      ("patient", f"/Patient/{p}"), ("mr", f"/MedicationRequest/mr-{p}")):
        r = get(gateway, path)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith(FHIR_JSON)
        assert r.text == texts[key]
        assert r.headers["ETag"] == 'W/"1"' and r.headers["Last-Modified"].endswith("GMT")
    assert '"value": 7.10,' in get(gateway, f"/Observation/a1c-1-{p}").text
    # what a server must change, and nothing else: the id it assigned (after resourceType), and
    # the urn:uuid reference to it
    condition_id = diabetes["opened"]["entry"][2]["response"]["location"].split("/")[1]
    condition = get(gateway, f"/Condition/{condition_id}").text
    assert condition == texts["condition"].replace('"Condition",', f'"Condition","id":"{condition_id}",', 1)
    eoc = get(gateway, f"/EpisodeOfCare/{diabetes['eoc']}").text
    assert eoc == texts["eoc"].replace(diabetes["condition_urn"], f"Condition/{condition_id}")
    assert validate_resource(json.loads(condition, parse_float=Decimal)) == []


def test_fhirpy_reads_and_searches(gateway, diabetes):
    p = diabetes["patient"]
    client = fhirpy(gateway)
    obs = client.reference("Observation", f"a1c-1-{p}").to_resource()
    assert obs["valueQuantity"]["value"] == 7.1 and obs["status"] == "final"
    observations = client.resources("Observation")
    hba1c = observations.search(patient=p, code=f"{LOINC}|4548-4").fetch_all()
    assert sorted(o["id"] for o in hba1c) == [f"a1c-1-{p}", f"a1c-2-{p}"]
    assert [o["id"] for o in observations.search(patient=p, code="4548-4", date__ge="2024-06-01").fetch_all()] \
        == [f"a1c-2-{p}"]
    assert [o["id"] for o in observations.search(patient=p, code="4548-4", date__le="2024-06-01").fetch_all()] \
        == [f"a1c-1-{p}"]
    assert [o["id"] for o in observations.search(patient=p, date="2024-09").fetch_all()] == [f"a1c-2-{p}", f"glu-{p}"]
    assert observations.search(patient=p, code=f"{LOINC}|4548-4", date__gt="2025").fetch_all() == []
    # several codes are alternatives; every page is followed through its next link
    paged = observations.search(patient=p, code=f"{LOINC}|4548-4,{LOINC}|2345-7").limit(1).fetch_all()
    assert sorted(o["id"] for o in paged) == sorted([f"a1c-1-{p}", f"a1c-2-{p}", f"glu-{p}"])
    assert [e["id"] for e in client.resources("Encounter").search(patient=p, status="finished").fetch_all()] \
        == [diabetes["enc1"], diabetes["enc2"]]
    assert [e["id"] for e in client.resources("EpisodeOfCare").search(patient=f"Patient/{p}").fetch_all()] \
        == [diabetes["eoc"]]
    assert [m["id"] for m in client.resources("MedicationRequest").search(
        patient=p, code="860975", authoredon__ge="2024-09-10").fetch_all()] == [f"mr-{p}"]
    assert [d["id"] for d in client.resources("DiagnosticReport").search(patient=p, date__le="2024-12").fetch_all()] \
        == [f"dr-{p}"]
    assert [o["id"] for o in observations.search(encounter=f"Encounter/{diabetes['enc2']}", code="2345-7")
            .fetch_all()] == [f"glu-{p}"]


def test_search_answers_bundles_with_the_bytes_sent_and_next_links(gateway, diabetes):
    p = diabetes["patient"]
    r = get(gateway, "/Observation", patient=p, code="4548-4", _count="1")
    bundle = r.json()
    assert bundle["type"] == "searchset" and len(bundle["entry"]) == 1
    assert exactjson.extract(r.text, "/entry/0/resource") == diabetes["texts"]["obs1"]
    assert bundle["entry"][0]["fullUrl"] == f"{fhir_base(gateway)}/Observation/a1c-1-{p}"
    following = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert following
    second = requests.get(following[0], headers=gateway.headers, timeout=30)
    assert exactjson.extract(second.text, "/entry/0/resource") == diabetes["texts"]["obs2"]
    assert not [link for link in second.json()["link"] if link["relation"] == "next"]


def test_everything_of_a_patient(gateway, diabetes):
    p = diabetes["patient"]
    bundle = fhirpy(gateway).execute(f"Patient/{p}/$everything", method="get")
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["EpisodeOfCare", "Patient", "Condition", "Encounter", "Observation", "Encounter",
                     "Observation", "Observation", "MedicationRequest", "DiagnosticReport"]
    r = get(gateway, f"/Patient/{p}/$everything")
    assert exactjson.extract(r.text, "/entry/4/resource") == diabetes["texts"]["obs1"]
    assert get(gateway, f"/Patient/{uid('nobody')}/$everything").status_code == 404


def test_fhirclient_reads_the_capability_statement_and_resources(gateway, diabetes):
    p = diabetes["patient"]
    smart = fhirclient_client.FHIRClient(settings={"app_id": "medicon-test", "api_base": fhir_base(gateway)})
    smart.server.session.headers["Authorization"] = f"Bearer {gateway.token}"
    smart.prepare()
    capability = smart.server.capabilityStatement
    assert capability.fhirVersion == "4.0.1"
    searched = {r.type: {p.name for p in r.searchParam or []} for r in capability.rest[0].resource}
    assert {"patient", "code", "date", "status", "_id"} <= searched["Observation"]
    assert searched["MedicationRequest"] >= {"code", "authoredon", "status", "patient"}
    assert validate_resource(get(gateway, "/metadata").json()) == []
    obs = FcObservation.read(f"a1c-2-{p}", smart.server)
    assert obs.valueQuantity.value == 6.8 and obs.subject.reference == f"Patient/{p}"
    found = list(FcObservation.where(struct={"patient": p, "code": f"{LOINC}|4548-4"}).perform_resources_iter(
        smart.server))
    assert sorted(o.id for o in found) == [f"a1c-1-{p}", f"a1c-2-{p}"]
    everything = FcBundle(smart.server.request_json(f"Patient/{p}/$everything"))
    assert len(everything.entry) == 10


def test_updates_are_versions_and_entered_in_error_is_one(gateway, diabetes):
    p, texts = diabetes["patient"], diabetes["texts"]
    wrong = texts["obs1"].replace('"status": "final"', '"status": "entered-in-error"')
    r = post_bundle(gateway, transaction(entry(wrong, "PUT", f"Observation/a1c-1-{p}")))
    assert r.status_code == 200, r.text
    response = r.json()["entry"][0]["response"]
    assert response["status"] == "200 OK" and response["location"] == f"Observation/a1c-1-{p}/_history/2"
    client = fhirpy(gateway)
    history = client.execute(f"Observation/a1c-1-{p}/_history", method="get")
    assert history["type"] == "history"
    assert [e["resource"]["status"] for e in history["entry"]] == ["entered-in-error", "final"]
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']
    raw = get(gateway, f"/Observation/a1c-1-{p}/_history")
    assert [exactjson.extract(raw.text, f"/entry/{i}/resource") for i in (0, 1)] == [wrong, texts["obs1"]]
    assert get(gateway, f"/Observation/a1c-1-{p}/_history/1").text == texts["obs1"]
    assert get(gateway, f"/Observation/a1c-1-{p}").text == wrong
    assert get(gateway, f"/Observation/a1c-1-{p}").headers["ETag"] == 'W/"2"'
    # search sees the latest version only
    finals = client.resources("Observation").search(patient=p, code="4548-4", status="final").fetch_all()
    assert [o["id"] for o in finals] == [f"a1c-2-{p}"]
    # the update is an amendment record correcting the encounter record that held version 1
    r = requests.get(f"{gateway.url}/medicon/v1/episodes/{diabetes['eoc']}/history", headers=gateway.headers,
                     timeout=30)
    records = r.json()["records"]
    assert records[-1]["record"]["schema"].endswith("/amendment/v2")
    assert records[-1]["record"]["body"]["corrects"] == records[1]["cid"]
    assert get(gateway, f"/Observation/a1c-1-{p}/_history/3").status_code == 404


def test_fhirpy_creates_through_a_transaction_bundle(gateway):
    """A transaction as fhirpy sends one (its own JSON: numbers as Python floats), with
    urn:uuid references between entries; then read back and searched with fhirpy."""
    p = uid("p")
    eoc, enc, obs = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    subject = {"reference": f"Patient/{p}"}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": eoc, "request": {"method": "POST", "url": "EpisodeOfCare"},
         "resource": {"resourceType": "EpisodeOfCare", "status": "active", "patient": subject}},
        {"fullUrl": enc, "request": {"method": "POST", "url": "Encounter"},
         "resource": {"resourceType": "Encounter", "status": "finished", "subject": subject,
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                      "episodeOfCare": [{"reference": eoc}]}},
        {"fullUrl": obs, "request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation", "status": "final", "subject": subject,
                      "code": {"coding": [{"system": LOINC, "code": "4548-4"}]}, "encounter": {"reference": enc},
                      "effectiveDateTime": "2025-02-03", "valueQuantity": {"value": 6.4, "unit": "%"}}}]}
    client = fhirpy(gateway)
    answer = client.execute("", method="post", data=bundle)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created"] * 3
    obs_id = answer["entry"][2]["response"]["location"].split("/")[1]
    enc_id = answer["entry"][1]["response"]["location"].split("/")[1]
    read = client.reference("Observation", obs_id).to_resource()
    assert read["encounter"]["reference"] == f"Encounter/{enc_id}" and read["valueQuantity"]["value"] == 6.4
    found = client.resources("Observation").search(patient=p, code=f"{LOINC}|4548-4", date__ge="2025").fetch_all()
    assert [o["id"] for o in found] == [obs_id]
    episode = client.resources("EpisodeOfCare").search(patient=p).fetch_all()[0]
    everything = client.execute(f"Patient/{p}/$everything", method="get")
    assert [e["resource"]["id"] for e in everything["entry"]] == [episode["id"], enc_id, obs_id]


def test_a_transaction_sent_again_with_its_idempotency_key_is_applied_once(gateway):
    p = uid("p")
    urn = f"urn:uuid:{uuid.uuid4()}"
    bundle = transaction(
        entry('{"resourceType": "EpisodeOfCare", "id": "eoc-%s", "status": "active", "patient": {"reference": '
              '"Patient/%s"}, "diagnosis": [{"condition": {"reference": "%s"}}]}' % (p, p, urn), "PUT",
              f"EpisodeOfCare/eoc-{p}"),
        entry('{"resourceType": "Condition", "subject": {"reference": "Patient/%s"}, "code": {"text": "T2DM"}}' % p,
              "POST", "Condition", urn))
    key = {"Idempotency-Key": f"tx-{p}"}
    first, again = (post_bundle(gateway, bundle, **key) for _ in range(2))
    assert first.status_code == again.status_code == 200, again.text
    assert [e["response"] for e in again.json()["entry"]] == [e["response"] for e in first.json()["entry"]]
    r = requests.get(f"{gateway.url}/medicon/v1/episodes/eoc-{p}", headers=gateway.headers, timeout=30)
    assert r.json()["length"] == 1
    changed = bundle.replace("T2DM", "Type 2 diabetes")
    # another Bundle under the same key is another request: taken afresh (and refused here: the
    # EpisodeOfCare it would open exists, so its new Condition has no episode to go to)
    assert post_bundle(gateway, changed, **key).status_code == 400


def test_a_refused_transaction_names_each_entry_and_writes_nothing(gateway):
    p = uid("p")
    eoc = f"eoc-{p}"
    entries = [
        entry('{"resourceType": "EpisodeOfCare", "id": "%s", "status": "active", "patient": {"reference": '
              '"Patient/%s"}}' % (eoc, p), "PUT", f"EpisodeOfCare/{eoc}"),
        entry(observation(f"o1-{p}", p, "Encounter/none", "1.0", "2024-01-01").replace('"final"', '"done"'),
              "PUT", f"Observation/o1-{p}"),
        entry('{"resourceType": "Observation", "id": "o2-%s", "status": "final", "code": {"text": "x"}, '
              '"subject": {"reference": "Patient/%s"}}' % (p, p), "PUT", f"Observation/o2-{p}"),
        entry('{"resourceType": "Observation", "id": "o3-%s"}' % p, "DELETE", f"Observation/o3-{p}")]
    bundle = transaction(*entries)
    r = post_bundle(gateway, bundle)
    assert r.status_code == 400 and r.headers["Content-Type"].startswith(FHIR_JSON)
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    where = {(i["expression"][0], i["diagnostics"].split(":")[0]) for i in outcome["issue"]}
    assert ("Bundle.entry[1]", "Observation at /status") in where
    assert any(e == "Bundle.entry[3]" for e, _ in where)
    assert all(i["severity"] == "error" and i["code"] == "invalid" for i in outcome["issue"])
    assert validate_resource(outcome) == []
    # entry 2 has no episode: reported once the entries are valid
    r = post_bundle(gateway, transaction(entries[0], entries[1].replace('"done"', '"final"'), entries[2]))
    assert r.status_code == 400
    assert all("expression" in i for i in r.json()["issue"]), r.text
    issues = {i["expression"][0]: i["diagnostics"] for i in r.json()["issue"]}
    assert "no episode" in issues["Bundle.entry[2]"] and "Encounter/none is unknown" in issues["Bundle.entry[1]"]
    r = requests.get(f"{gateway.url}/medicon/v1/patients/{p}/episodes", headers=gateway.headers, timeout=30)
    assert r.json()["episodes"] == []
    assert post_bundle(gateway, '{"resourceType": "Bundle", "type": "batch", "entry": []}').status_code == 400
    assert post_bundle(gateway, "{not json").status_code == 400


def test_scopes_hide_what_a_caller_may_not_see(gateway, diabetes):
    p = diabetes["patient"]
    other = make_token(gateway.data_dir, role="clinician", patients=[uid("p")])
    assert get(gateway, f"/Observation/a1c-2-{p}", other).status_code == 404
    assert get(gateway, f"/Observation/a1c-2-{p}", other).json()["issue"][0]["code"] == "not-found"
    assert get(gateway, "/Observation", other, patient=p).json().get("entry", []) == []
    assert get(gateway, f"/Patient/{p}/$everything", other).status_code == 404
    with pytest.raises(ResourceNotFound):
        fhirpy(gateway, other).reference("Observation", f"a1c-2-{p}").to_resource()
    own = make_token(gateway.data_dir, role="patient", patients=[p])
    assert get(gateway, f"/Observation/a1c-2-{p}", own).text == diabetes["texts"]["obs2"]
    assert len(get(gateway, "/Observation", own).json()["entry"]) == 3  # only their own, unasked
    assert get(gateway, "/metadata", own).status_code == 200
    assert requests.get(fhir_base(gateway) + "/metadata", timeout=30).status_code == 401
    # a patient may read, not write
    r = post_bundle(gateway, transaction(entry(diabetes["texts"]["obs2"], "PUT", f"Observation/a1c-2-{p}")), own)
    assert r.status_code == 403


def test_errors_are_operation_outcomes(gateway):
    assert get(gateway, "/NotAType/x").status_code == 404
    assert get(gateway, "/Observation", foo="bar").status_code == 400
    assert get(gateway, "/Observation", **{"code:text": "x"}).status_code == 400
    assert get(gateway, "/Observation", date="yesterday").status_code == 400
    lenient = requests.get(fhir_base(gateway) + "/Observation", params={"foo": "bar", "_count": "1"},
                           headers={**gateway.headers, "Prefer": "handling=lenient"}, timeout=30)
    assert lenient.status_code == 200 and "foo" not in lenient.json()["link"][0]["url"]
    assert get(gateway, "/Condition", code="x").status_code == 400  # read by id only
    r = requests.delete(fhir_base(gateway) + "/Observation/x", headers=gateway.headers, timeout=30)
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"


def test_an_attachment_url_reads_through_the_facade_with_the_callers_rights(gateway, diabetes):
    p = diabetes["patient"]
    pdf = b"%PDF-1.7 HbA1c report " + os.urandom(16)
    r = requests.post(f"{gateway.url}/api/v0/add", files={"file": ("report.pdf", pdf, "application/pdf")},
                      headers={**gateway.headers, "X-Medicon-Patient": p}, timeout=60)
    cid = json.loads(r.text.splitlines()[-1])["Hash"]
    document = ('{"resourceType": "DocumentReference", "id": "doc-%s", "status": "current", "subject": {"reference": '
                '"Patient/%s"}, "content": [{"attachment": {"contentType": "application/pdf", "url": "ipfs://%s", '
                '"title": "HbA1c report"}}], "context": {"encounter": [{"reference": "Encounter/%s"}]}}') % (
                    p, p, cid, diabetes["enc2"])
    r = post_bundle(gateway, transaction(entry(document, "PUT", f"DocumentReference/doc-{p}")))
    assert r.status_code == 200, r.text
    read = fhirpy(gateway).reference("DocumentReference", f"doc-{p}").to_resource()
    url = read["content"][0]["attachment"]["url"]
    assert url == f"ipfs://{cid}"
    binary = get(gateway, f"/Binary/{url.removeprefix('ipfs://')}")
    assert binary.status_code == 200 and binary.content == pdf
    assert binary.headers["Content-Type"] == "application/pdf"
    own = make_token(gateway.data_dir, role="patient", patients=[p])
    assert get(gateway, f"/Binary/{cid}", own).content == pdf
    other = make_token(gateway.data_dir, role="patient", patients=[uid("p")])
    assert get(gateway, f"/Binary/{cid}", other).status_code == 404
    assert get(gateway, "/Binary/not-a-cid").status_code == 404


# --- the index: what it holds, and that it goes with the patient ------------------------------------

def index_rows(data_dir: str, query: str) -> list[tuple]:
    return store_sql(data_dir, "fhir", query)


def test_the_index_holds_no_identifier_nor_code_in_clear(gateway, diabetes):
    p = diabetes["patient"]
    rows = index_rows(gateway.data_dir, "SELECT * FROM fhir_resources") + index_rows(
        gateway.data_dir, "SELECT * FROM fhir_params")
    assert rows
    dump = "\n".join("\t".join(map(str, row)) for row in rows)
    for clear in (p, diabetes["eoc"], diabetes["enc1"], f"a1c-1-{p}", "4548-4", LOINC, "860975", "final"):
        assert clear not in dump, clear
    assert "Observation" in dump and "2024-03-05T07:30:00.000000" in dump  # types and date ranges are


def test_shredding_a_patient_erases_their_index_rows(gateway, kubo):
    gw = start_gateway(kubo)
    try:
        keep, gone = uid("p"), uid("p")
        for p in (keep, gone):
            eoc = f"eoc-{p}"
            r = post_bundle(gw, transaction(
                entry('{"resourceType": "EpisodeOfCare", "id": "%s", "status": "active", "patient": {"reference": '
                      '"Patient/%s"}}' % (eoc, p), "PUT", f"EpisodeOfCare/{eoc}")))
            assert r.status_code == 200, r.text
        count = "SELECT count(*) FROM fhir_resources"
        params = "SELECT count(*) FROM fhir_params"
        assert index_rows(gw.data_dir, count) == [(2,)]
        [(both,)] = index_rows(gw.data_dir, params)
        shred = subprocess.run([sys.executable, "-m", "gateway", "keys", "shred", "--patient", gone, "--data-dir",
                                gw.data_dir], capture_output=True, text=True,
                               env={**os.environ, **storage_env(gw.data_dir)})
        assert shred.returncode == 0, shred.stderr
        assert "FHIR search index" in shred.stderr
        assert index_rows(gw.data_dir, count) == [(1,)]
        assert index_rows(gw.data_dir, params) == [(both // 2,)]  # only keep's status tokens are left
        assert get(gw, f"/EpisodeOfCare/eoc-{gone}").status_code == 404
        assert get(gw, f"/EpisodeOfCare/eoc-{keep}").status_code == 200
    finally:
        assert gw.stop() == 0


async def test_check_finds_and_repairs_what_the_index_lacks(aiohttp_client, kubo):
    """The index is fed after each append, and a failure there never undoes the append:
    ``check`` reports records whose resources the index lacks, ``check --repair`` indexes them."""
    client = await app_client(aiohttp_client, gateway_config(kubo))
    service = client.app[SERVICE]
    p = uid("p")
    eoc = ('{"resourceType": "EpisodeOfCare", "id": "eoc-%s", "status": "active", "patient": {"reference": '
           '"Patient/%s"}}') % (p, p)
    r = await client.post("/fhir/r4", data=transaction(entry(eoc, "PUT", f"EpisodeOfCare/eoc-{p}")).encode(),
                          headers={"Content-Type": FHIR_JSON})
    assert r.status == 200, await r.text()
    [episode] = await service.storage.heads.episodes_after("", 2)
    [cid] = [rec.cid for rec in await service.storage.heads.history(episode.id, -1, 10)]
    assert (await check_service(service))["unindexed"] == []
    # the index loses the rows (the data key stays: this is no shredding)
    assert await service.storage.fhir.erase_patient(FhirFacade(service).patient_pseudonym(p)) == 1
    assert (await client.get(f"/fhir/r4/EpisodeOfCare/eoc-{p}")).status == 404
    report = await check_service(service)
    assert report["unindexed"] == [cid] and not report["clean"]
    report = await check_service(service, repair=True)
    assert {"indexed": cid} in report["repaired"] and report["clean"]
    r = await client.get(f"/fhir/r4/EpisodeOfCare/eoc-{p}")
    assert r.status == 200 and await r.text() == eoc
    assert (await check_service(service))["unindexed"] == []


async def test_patients_with_ids_beyond_fhirs_are_found(aiohttp_client, kubo):
    """A Medicon patient id may hold ':' and '_', which a FHIR id may not: search and
    $everything still find that patient's resources."""
    client = await app_client(aiohttp_client, gateway_config(kubo))
    p, episode = f"clinic:{uid('p')}_x", uid("e")
    r = await client.post(f"/medicon/v1/patients/{p}/episodes", json={
        "schema": "https://medicon.example/schemas/episode-opened/v2", "episode": episode, "author": "dr.a",
        "body": {"status": "active", "fhir": [{"resourceType": "Observation", "id": f"o-{episode}",
                                               "status": "final", "code": {"text": "weight"}}]}})
    assert r.status == 201, await r.text()
    r = await client.get("/fhir/r4/Observation", params={"patient": p})
    assert [e["resource"]["id"] for e in (await r.json())["entry"]] == [f"o-{episode}"]
    r = await client.get(f"/fhir/r4/Patient/{p}/$everything")
    assert r.status == 200 and len((await r.json())["entry"]) == 1
