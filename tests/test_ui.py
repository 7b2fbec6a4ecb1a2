"""The patient timeline UI (``/ui/``) in real headless Chromium (Debian's ``/usr/bin/chromium``),
driven by Playwright, against the gateway process in front of the session's real Kubo, with
real API tokens of each role.

Every wait is for a condition (Playwright's auto-waiting ``expect``), never a sleep. With
``MEDICON_SCREENSHOTS=1`` the main screens are saved to ``docs/screenshots/`` (the README
shows them); otherwise they go to the test's temporary folder, so the code path always runs.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import struct
import time
import uuid
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from conftest import ROOT, bearer, make_token
from gateway.http import auth, ui

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BASE = "https://medicon.example/schemas/"
OPENED, ENCOUNTER, AMENDMENT, CLOSED = (BASE + k + "/v1" for k in ("episode-opened", "encounter", "amendment", "episode-closed"))
WAIT_MS = 20_000


# --- attachments made here: a real PNG and a real PDF -----------------------------------------

def png(width: int, height: int, pixel) -> bytes:
    """A truecolour PNG; ``pixel(x, y)`` gives (r, g, b)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\0" + bytes(c for x in range(width) for c in pixel(x, y)) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def xray_png() -> tuple[bytes, bytes]:
    """An X-ray-like picture with film grain, noisy enough to stay above 1 MiB compressed (so
    the UI has to read it in byte ranges): the PNG, and its pixels as RGBA."""
    noise = os.urandom(900 * 700 * 3)
    width, height = 900, 700

    def pixel(x, y):
        bone = abs(x - 450) < 70 + (y - 350) ** 2 // 900 and abs(y - 350) < 300
        base = 150 if bone else 25
        i = (y * width + x) * 3
        return (min(255, base + noise[i] % 60), min(255, base + noise[i + 1] % 60), min(255, base + noise[i + 2] % 60))
    rgb = bytes(c for y in range(height) for x in range(width) for c in pixel(x, y))
    rgba = bytearray(width * height * 4)
    for channel in range(3):
        rgba[channel::4] = rgb[channel::3]
    rgba[3::4] = b"\xff" * (width * height)
    return png(width, height, pixel), bytes(rgba)


def pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` (hand-made, with a correct cross-reference table)."""
    stream = f"BT /F1 18 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


# --- data, written through the gateway as any client would -----------------------------------

class Client:
    def __init__(self, gw, token: str) -> None:
        self.url = gw.url
        self.http = requests.Session()
        self.http.headers.update(bearer(token))

    def post(self, path: str, doc: dict) -> dict:
        r = self.http.post(self.url + "/medicon/v1" + path, json=doc, timeout=60)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def get(self, path: str) -> dict:
        r = self.http.get(self.url + "/medicon/v1" + path, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def attach(self, patient: str, name: str, data: bytes, content_type: str) -> str:
        r = self.http.post(self.url + "/api/v0/add", files={"file": (name, data, content_type)},
                           headers={"X-Medicon-Patient": patient}, timeout=120)
        assert r.status_code == 200, r.text
        return json.loads(r.text.splitlines()[-1])["Hash"]


def seed_patient(gw, client: Client | None = None) -> dict:
    """A patient with two concurrent episodes (diabetes follow-up, open; knee injury, closed):
    lab results with a FHIR Observation and a PDF report, an X-ray image, a visit, an amendment
    of the lab results, a pharmacy dispense."""
    client = client or Client(gw, gw.token)
    patient = f"patient-{uuid.uuid4().hex[:8]}"
    diabetes, knee = f"ep-diabetes-{uuid.uuid4().hex[:6]}", f"ep-knee-{uuid.uuid4().hex[:6]}"
    report_pdf, (xray, xray_rgba) = pdf("HbA1c 7.1 % - Central Laboratory"), xray_png()
    pdf_cid = client.attach(patient, "hba1c-report.pdf", report_pdf, "application/pdf")
    png_cid = client.attach(patient, "knee-xray.png", xray, "image/png")
    out = {"patient": patient, "diabetes": diabetes, "knee": knee, "pdf": report_pdf, "pdf_cid": pdf_cid,
           "png": xray, "png_rgba": xray_rgba, "png_cid": png_cid, "cids": {}}

    def add(name, episode, doc, opening=False):
        path = f"/patients/{patient}/episodes" if opening else f"/episodes/{episode}/records"
        answer = client.post(path, {"episode": episode, **doc} if opening else doc)
        out["cids"][name] = answer["cid"]
        return answer["cid"]

    add("diabetes-opened", diabetes, {
        "schema": OPENED, "author": "dr.ana.silva@clinic.example", "recorded_at": "2026-03-02T08:15:00Z",
        "body": {"type": {"system": "http://snomed.info/sct", "code": "390906007", "display": "Diabetes follow-up"},
                 "reason": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Type 2 diabetes mellitus"}],
                 "managingOrganization": "Clinic Example, Endocrinology", "careManager": "Dr. Ana Silva",
                 "period": {"start": "2026-03-02T08:00:00Z"}, "status": "active"}}, opening=True)
    lab = add("lab", diabetes, {
        "schema": ENCOUNTER, "author": "lab.central@clinic.example", "recorded_at": "2026-03-03T09:40:00Z",
        "body": {"class": "lab", "status": "finished", "notes": "Fasting sample.",
                 "period": {"start": "2026-03-03T07:30:00Z", "end": "2026-03-03T09:30:00Z"},
                 "observations": [
                     {"code": {"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c"},
                      "value": {"value": 7.1, "unit": "%"}, "interpretation": {"code": "H", "display": "High"}},
                     {"code": {"system": "http://loinc.org", "code": "1558-6", "display": "Fasting glucose"},
                      "value": 128, "unit": "mg/dL"}],
                 "fhir": [{"resourceType": "Observation", "status": "final",
                           "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4",
                                                "display": "Hemoglobin A1c/Hemoglobin.total in Blood"}]},
                           "valueQuantity": {"value": 7.1, "unit": "%"},
                           "effectiveDateTime": "2026-03-03T07:30:00Z"}],
                 "attachments": [{"cid": pdf_cid, "contentType": "application/pdf", "title": "HbA1c lab report",
                                  "size": len(report_pdf)}]}})
    add("knee-opened", knee, {
        "schema": OPENED, "author": "dr.joao.costa@clinic.example", "recorded_at": "2026-03-10T14:20:00Z",
        "body": {"type": "Left knee injury", "managingOrganization": "Clinic Example, Orthopaedics",
                 "period": {"start": "2026-03-10T14:00:00Z"}}}, opening=True)
    add("xray", knee, {
        "schema": ENCOUNTER, "author": "imaging@clinic.example", "recorded_at": "2026-03-10T15:05:00Z",
        "body": {"class": "imaging", "status": "finished", "notes": "X-ray of the left knee: no fracture.",
                 "attachments": [{"cid": png_cid, "contentType": "image/png", "title": "Knee X-ray",
                                  "size": len(xray)}]}})
    add("visit", diabetes, {
        "schema": ENCOUNTER, "author": "dr.ana.silva@clinic.example", "recorded_at": "2026-03-16T10:10:00Z",
        "body": {"class": "doctor", "status": "finished", "notes": "Metformin increased to 1000 mg twice daily.",
                 "fhir": [{"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                           "medicationCodeableConcept": {"text": "Metformin 1000 mg"},
                           "subject": {"reference": f"Patient/{patient}"},
                           "dosageInstruction": [{"text": "1 tablet twice daily"}]}]}})
    add("physio", knee, {
        "schema": ENCOUNTER, "author": "physio@clinic.example", "recorded_at": "2026-03-24T09:00:00Z",
        "body": {"class": "outpatient", "status": "finished", "notes": "Physiotherapy, 6 sessions."}})
    add("amendment", diabetes, {
        "schema": AMENDMENT, "author": "lab.central@clinic.example", "recorded_at": "2026-04-02T11:00:00Z",
        "body": {"corrects": lab, "reason": "Fasting glucose was reported in the wrong unit.",
                 "changes": {"observations": [{"code": {"system": "http://loinc.org", "code": "1558-6"},
                                               "value": 7.1, "unit": "mmol/L"}]}}})
    add("knee-closed", knee, {
        "schema": CLOSED, "author": "dr.joao.costa@clinic.example", "recorded_at": "2026-04-20T16:30:00Z",
        "body": {"reason": "Recovered; discharged from physiotherapy.", "period_end": "2026-04-20T16:00:00Z"}})
    add("pharmacy", diabetes, {
        "schema": ENCOUNTER, "author": "pharmacy@clinic.example", "recorded_at": "2026-05-05T08:30:00Z",
        "body": {"class": "pharmacy", "status": "finished", "notes": "Metformin 1000 mg, 60 tablets dispensed."}})
    return out


@pytest.fixture(scope="module")
def world(gateway):
    """One patient everyone reads (the mutating tests make their own), another patient, and a
    token of each kind the tests sign in with."""
    data = seed_patient(gateway)
    other = Client(gateway, gateway.token)
    data["other"] = f"patient-{uuid.uuid4().hex[:8]}"
    other.post(f"/patients/{data['other']}/episodes",
               {"schema": OPENED, "author": "dr.x", "body": {"type": "Other patient's care", "managingOrganization": "Elsewhere"}})
    data["tokens"] = {
        "clinician": make_token(gateway.data_dir, role="clinician"),
        "patient": make_token(gateway.data_dir, role="patient", patients=[data["patient"]]),
        "auditor": make_token(gateway.data_dir, role="auditor"),
    }
    return data


# --- the browser -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("CHROMIUM IS REQUIRED: the UI tests drive Debian's Chromium at /usr/bin/chromium.\n"
                    "Install it with: apt-get install -y chromium", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is required: .venv/bin/pip install -e '.[test]'", pytrace=False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Tab:
    """A browser tab of its own (fresh sessionStorage), watching every request it makes and
    every script error or CSP violation."""

    def __init__(self, browser, gateway, shots: Path) -> None:
        from playwright.sync_api import expect
        expect.set_options(timeout=WAIT_MS)
        self.context = browser.new_context(base_url=gateway.url, locale="en-GB", timezone_id="UTC",
                                           viewport={"width": 1440, "height": 960})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.requests = []
        self.responses = []
        self.errors = []
        self.shots = shots
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("response", lambda response: self.responses.append(response))
        self.page.on("pageerror", lambda exc: self.errors.append(f"script error: {exc}"))
        self.page.on("console", lambda msg: self.errors.append(msg.text)
                     if "Content Security Policy" in msg.text or "Refused to" in msg.text else None)

    def sign_in(self, token: str) -> None:
        page = self.page
        page.goto("/ui/")
        page.get_by_label("Access token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        from playwright.sync_api import expect
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()

    def show_patient(self, patient: str) -> None:
        from playwright.sync_api import expect
        self.page.get_by_label("Patient", exact=True).fill(patient)
        self.page.get_by_role("button", name="Show timeline").click()
        # Every episode's history and verification are in (not merely "none pending yet").
        expect(self.page.locator("#timeline")).to_have_attribute("data-shown", patient)
        expect(self.page.locator("#timeline")).not_to_have_attribute("aria-busy", "true")
        expect(self.page.locator(".lane-verify[data-verify='pending']")).to_have_count(0)

    def card(self, text: str):
        return self.page.locator("button.rec", has_text=text)

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=False)
        assert path.stat().st_size > 10_000
        return path


@pytest.fixture
def tab(browser, gateway, tmp_path):
    shots = ROOT / "docs" / "screenshots" if os.environ.get("MEDICON_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    t = Tab(browser, gateway, shots)
    yield t
    t.context.close()
    assert not t.errors, t.errors


def scroll_detail_to(locator) -> None:
    """Scroll the record detail panel (only) so ``locator`` is at its top, for a screenshot."""
    locator.evaluate("el => { const panel = el.closest('.detail'); "
                     "panel.scrollTop = el.getBoundingClientRect().top - panel.getBoundingClientRect().top + panel.scrollTop - 12; }")


def tokens_in_urls(tab: Tab, *tokens: str) -> list[str]:
    return [r.url for r in tab.requests if any(tok in r.url for tok in tokens)]


# --- the static bundle -------------------------------------------------------------------------

class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline_scripts, self.inline_styles, self.handlers, self.sources = 0, 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and "src" not in attrs:
            self.inline_scripts += 1
        if tag == "style":
            self.inline_styles += 1
        self.handlers += [name for name in attrs if name.startswith("on") or name == "style"]
        self.sources += [attrs[k] for k in ("src", "href") if k in attrs]


def test_static_bundle_is_public_hardened_and_holds_no_data(gateway, world):
    anonymous = requests.get(gateway.url + "/ui/", timeout=30)
    assert anonymous.status_code == 200 and anonymous.headers["Content-Type"].startswith("text/html")
    csp = anonymous.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp
    assert anonymous.headers["X-Content-Type-Options"] == "nosniff"
    assert anonymous.headers["Referrer-Policy"] == "no-referrer"
    # the same bytes with or without a credential: nothing in them depends on who asks
    signed = requests.get(gateway.url + "/ui/", headers=gateway.headers, timeout=30)
    assert signed.content == anonymous.content
    markup = _Markup()
    markup.feed(anonymous.text)
    assert markup.inline_scripts == 0 and markup.inline_styles == 0 and markup.handlers == []
    assert markup.sources and all(not re.match(r"^(https?:)?//", s) for s in markup.sources), markup.sources
    for name, asset in ui.load_bundle().items():
        r = requests.get(gateway.url + "/ui/" + name, timeout=30)
        assert r.status_code == 200 and r.content == asset.body, name
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Content-Security-Policy"] == ui.CSP
        assert world["patient"].encode() not in r.content and not re.search(rb"mdc_[A-Za-z0-9_-]{20}", r.content)
        assert not re.search(rb"https?://(?!medicon\.example/schemas/|www\.w3\.org/2000/svg)", r.content), name
    etag = requests.get(gateway.url + "/ui/app.js", timeout=30).headers["ETag"]
    assert requests.get(gateway.url + "/ui/app.js", headers={"If-None-Match": etag}, timeout=30).status_code == 304
    redirect = requests.get(gateway.url + "/ui", allow_redirects=False, timeout=30)
    assert redirect.status_code == 308 and redirect.headers["Location"] == "/ui/"
    assert requests.get(gateway.url + "/ui/missing.js", timeout=30).status_code == 404
    # public means these two routes only: the API and the IPFS paths still need a credential
    assert auth.PUBLIC_ROUTES == {ui.ROUTE_INDEX, ui.ROUTE_ASSET}
    for path in ("/medicon/v1/whoami", f"/medicon/v1/patients/{world['patient']}/episodes",
                 f"/ipfs/{world['pdf_cid']}", "/ui/../medicon/v1/whoami", "/ui/%2e%2e/medicon/v1/whoami",
                 f"/ui/../medicon/v1/patients/{world['patient']}/episodes"):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        conn.request("GET", path)  # sent as written: no client-side removal of dot segments
        answer = conn.getresponse()
        body = answer.read().decode()
        conn.close()
        assert answer.status in (401, 404) and world["patient"] not in body, (path, answer.status)


def test_whoami_and_schema_documents(gateway, world):
    token = world["tokens"]["patient"]
    r = requests.get(gateway.url + "/medicon/v1/whoami", headers=bearer(token), timeout=30)
    assert r.status_code == 200 and token not in r.text
    me = r.json()
    assert me["role"] == "patient" and me["patients"] == [world["patient"]] and me["episodes"] is None
    assert me["principal"].startswith("token:")
    assert requests.get(gateway.url + "/medicon/v1/whoami", timeout=30).status_code == 401
    plain = requests.get(gateway.url + "/medicon/v1/schemas", headers=gateway.headers, timeout=30).json()
    assert "schemas" not in plain and ENCOUNTER in plain["kinds"]
    full = requests.get(gateway.url + "/medicon/v1/schemas?full=1", headers=gateway.headers, timeout=30).json()
    assert full["kinds"] == plain["kinds"]
    assert {ENCOUNTER, BASE + "envelope/v1", BASE + "common/v1"} <= set(full["schemas"])
    assert full["schemas"][ENCOUNTER]["$id"] == ENCOUNTER
    bad = requests.get(gateway.url + "/medicon/v1/schemas?full=yes", headers=gateway.headers, timeout=30)
    assert bad.status_code == 400 and "full" in bad.json()["error"]["message"]


# --- in the browser ----------------------------------------------------------------------------

def test_sign_in_refuses_a_bad_token_and_keeps_the_token_out_of_urls(tab, world):
    from playwright.sync_api import expect
    page = tab.page
    page.goto("/ui/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    tab.screenshot("sign-in")
    page.get_by_label("Access token").fill("mdc_" + "x" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#token-error")).to_contain_text("not accepted")
    expect(page.get_by_label("Access token")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#announcer")).to_contain_text("Sign-in failed")
    token = world["tokens"]["clinician"]
    tab.sign_in(token)
    expect(page.locator("#whoami-role")).to_have_text("clinician")
    assert page.evaluate("sessionStorage.getItem('medicon.token')") == token
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    page.reload()  # the tab keeps its session
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('medicon.token')") is None
    expect(page.get_by_label("Access token")).to_be_focused()
    assert tokens_in_urls(tab, token) == [] and token not in page.url
    assert any(r.url.endswith("/medicon/v1/whoami") and r.headers.get("authorization") == f"Bearer {token}"
               for r in tab.requests)


def test_timeline_shows_concurrent_episodes_as_lanes(tab, world):
    from playwright.sync_api import expect
    page = tab.page
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(world["patient"])
    lanes = page.locator("table.timeline thead th.lane-head")
    expect(lanes).to_have_count(2)
    expect(lanes.nth(0)).to_contain_text("Diabetes follow-up")
    expect(lanes.nth(0)).to_contain_text("Open")
    expect(lanes.nth(1)).to_contain_text("Left knee injury")
    expect(lanes.nth(1)).to_contain_text("Closed")
    cards = page.locator("button.rec")
    expect(cards).to_have_count(9)
    lane_of = [int(x) for x in cards.evaluate_all("cs => cs.map(c => c.dataset.lane)")]
    rows = [int(x) for x in cards.evaluate_all("cs => cs.map(c => c.dataset.row)")]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    # concurrent: each episode has records between the other's first and last
    knee_rows = [r for r, lane in zip(rows, lane_of) if lane == 1]
    diabetes_rows = [r for r, lane in zip(rows, lane_of) if lane == 0]
    assert diabetes_rows[0] < knee_rows[0] < diabetes_rows[-1] and any(knee_rows[0] < r < knee_rows[-1] for r in diabetes_rows)
    # in order, with kind, author and time
    expect(cards.nth(1)).to_contain_text("Lab")
    expect(cards.nth(1)).to_contain_text("lab.central@clinic.example")
    expect(page.locator("tr", has=tab.card("Fasting sample")).locator("th.time")).to_have_text("09:40")
    expect(page.locator("tbody").nth(1).locator(".day-row")).to_contain_text("3 March 2026")
    tab.screenshot("timeline")

    # filters: kind, date range, episode
    page.get_by_label("Kind").select_option(label="Lab")
    expect(cards).to_have_count(1)
    expect(page.locator("#filter-status")).to_have_text("Showing 1 of 9 records.")
    page.get_by_label("Kind").select_option(label="All kinds")
    page.get_by_label("From", exact=True).fill("2026-03-10")
    page.get_by_label("To", exact=True).fill("2026-03-31")
    expect(cards).to_have_count(4)
    page.get_by_role("checkbox", name="Left knee injury").uncheck()
    expect(cards).to_have_count(1)
    expect(lanes).to_have_count(1)
    page.get_by_role("button", name="Clear filters").click()
    expect(cards).to_have_count(9)
    expect(page.get_by_role("checkbox", name="Left knee injury")).to_be_checked()


def test_record_detail_renders_fields_fhir_raw_json_and_chain_position(tab, world, gateway):
    from playwright.sync_api import expect
    page = tab.page
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(world["patient"])
    tab.card("Fasting sample").click()
    detail = page.locator("#detail")
    expect(detail.get_by_role("heading", name="Lab · #1")).to_be_focused()
    lab = world["cids"]["lab"]
    expect(detail.locator("#detail-cid")).to_have_text(lab)
    chain = detail.locator("section", has=page.get_by_role("heading", name="Chain position"))
    expect(chain.locator(".field-row", has_text="Seq")).to_contain_text("1")
    expect(chain.locator(".field-row", has_text="Prev")).to_contain_text(world["cids"]["diabetes-opened"])
    observations = detail.locator("section", has=page.get_by_role("heading", name="Fields")).locator("table.obs")
    expect(observations).to_contain_text("Hemoglobin A1c (4548-4)")
    expect(observations).to_contain_text("7.1 %")
    expect(observations).to_contain_text("128 mg/dL")
    resource = detail.get_by_role("article", name="FHIR Observation")
    expect(resource).to_contain_text("Hemoglobin A1c/Hemoglobin.total in Blood (4548-4)")
    expect(resource.locator(".field-row", has_text="Value")).to_contain_text("7.1 %")
    expect(resource).to_contain_text("final")
    expect(detail.locator(".field-row", has_text="Period")).to_contain_text("3 Mar 2026, 07:30 – 3 Mar 2026, 09:30")
    scroll_detail_to(detail.get_by_role("heading", name="Chain position"))
    tab.screenshot("record-detail")
    raw = detail.locator("details.raw")
    expect(raw.locator("pre")).to_be_hidden()
    raw.locator("summary").click()
    expect(raw.locator("pre")).to_be_visible()
    shown = json.loads(raw.locator("pre").inner_text())
    stored = Client(gateway, world["tokens"]["clinician"]).get(f"/records/{lab}")["record"]
    assert shown == stored
    # prev opens the record before it in the chain
    chain.get_by_role("button", name=re.compile(r"open #0 Episode opened")).click()
    expect(detail.get_by_role("heading", name="Episode opened · #0")).to_be_visible()
    expect(detail.locator(".field-row", has_text="Prev")).to_contain_text("none: the first record")
    expect(detail.locator(".field-row", has_text="Managing organization")).to_contain_text("Clinic Example, Endocrinology")
    # the MedicationRequest of the visit
    tab.card("Metformin increased").click()
    expect(detail.get_by_role("article", name="FHIR MedicationRequest")).to_contain_text("Metformin 1000 mg")
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()
    expect(tab.card("Metformin increased")).to_be_focused()


def test_amendment_is_shown_as_a_correction_of_the_record_it_amends(tab, world):
    from playwright.sync_api import expect
    page = tab.page
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(world["patient"])
    lab_card, amendment_card = tab.card("Fasting sample"), tab.card("wrong unit")
    expect(lab_card.locator(".flag-corrected")).to_have_text("Corrected")
    expect(amendment_card.locator(".flag-correction")).to_have_text("Correction of #1 Lab")
    lab_card.click()
    detail = page.locator("#detail")
    corrections = detail.get_by_role("note", name="Corrections")
    expect(corrections).to_contain_text("Corrected by amendment #3")
    expect(corrections).to_contain_text("Fasting glucose was reported in the wrong unit.")
    expect(corrections.locator("table.obs")).to_contain_text("1558-6 http://loinc.org7.1 mmol/L")
    corrections.get_by_role("button", name="Open amendment #3").click()
    expect(detail.get_by_role("heading", name="Amendment · #3")).to_be_visible()
    expect(detail.locator(".correction-of")).to_contain_text("This record is a correction of")
    detail.locator(".correction-of").get_by_role("button", name=re.compile("#1 Lab")).click()
    expect(detail.get_by_role("heading", name="Lab · #1")).to_be_visible()


def test_attachments_are_shown_inline_and_large_ones_read_in_ranges(tab, world):
    from playwright.sync_api import expect
    page = tab.page
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(world["patient"])
    tab.card("X-ray of the left knee").click()
    detail = page.locator("#detail")
    detail.get_by_role("button", name="View Knee X-ray").click()
    image = detail.get_by_role("img", name="Knee X-ray")
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth === 900 && img.naturalHeight === 700",
                           arg=image.element_handle())
    assert image.get_attribute("src").startswith("blob:")
    assert len(world["png"]) > 1024 * 1024
    ranges = [r.all_headers().get("range") for r in tab.requests if f"/ipfs/{world['png_cid']}" in r.url and r.method == "GET"]
    assert ranges == ["bytes=0-1048575", f"bytes=1048576-{len(world['png']) - 1}"], ranges
    assert all(r.all_headers().get("authorization", "").startswith("Bearer ") for r in tab.requests if "/ipfs/" in r.url)
    received = b"".join(r.body() for r in tab.responses if f"/ipfs/{world['png_cid']}" in r.url and r.request.method == "GET")
    assert received == world["png"]
    # the picture on screen is the one attached, pixel for pixel
    assert page.evaluate(PIXELS_SHA256, image.element_handle()) == hashlib.sha256(world["png_rgba"]).hexdigest()
    expect(detail.locator(".viewer [role=status]")).to_have_text(f"{len(world['png']) / 2**20:.1f} MiB loaded.")
    scroll_detail_to(detail.get_by_role("heading", name="Knee X-ray"))
    tab.screenshot("attachment-image")

    tab.card("Fasting sample").click()
    detail.get_by_role("button", name="View HbA1c lab report").click()
    frame = detail.locator("iframe.pdf")
    expect(frame).to_have_attribute("src", re.compile("^blob:"))
    expect(frame).to_have_attribute("title", "PDF: HbA1c lab report")
    received = [r.body() for r in tab.responses if f"/ipfs/{world['pdf_cid']}" in r.url and r.request.method == "GET"]
    assert received == [world["pdf"]]  # small: one read, no ranges
    expect(detail.locator(".viewer [role=status]")).to_have_text(f"{len(world['pdf'])} bytes loaded.")
    # Chromium's own PDF viewer opens the blob inside the frame
    deadline = time.monotonic() + WAIT_MS / 1000
    while not any(f.url.startswith("chrome-extension://") and f.parent_frame and f.parent_frame.url == frame.get_attribute("src")
                  for f in page.frames):
        assert time.monotonic() < deadline, ("Chromium's PDF viewer did not open the attachment", [f.url for f in page.frames])
        page.wait_for_timeout(100)
    assert tokens_in_urls(tab, world["tokens"]["clinician"]) == []


def test_append_form_shows_the_gateways_problem_next_to_its_field_then_appends(tab, world, gateway):
    from playwright.sync_api import expect
    data = seed_patient(gateway)
    page = tab.page
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(data["patient"])
    page.get_by_role("button", name="Add record to Diabetes follow-up").click()
    dialog = page.get_by_role("dialog", name="Add a record to Diabetes follow-up")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_label("Record kind")).to_have_value(ENCOUNTER)
    expect(dialog.get_by_label("Author")).to_have_value(re.compile("^token:"))
    dialog.get_by_label("Notes").fill("Follow-up visit: feet examined, no ulcers.")
    dialog.get_by_role("button", name="Add observation").click()
    observation = dialog.get_by_role("group", name="Observation 1")
    code = observation.get_by_role("group", name="Code")
    code.get_by_role("textbox", name="Code", exact=True).fill("8867-4")
    code.get_by_label("Display").fill("Heart rate")
    observation.get_by_role("group", name="Value").get_by_label("Number").fill("72")
    dialog.get_by_role("button", name="Append record").click()  # no class chosen: the gateway refuses
    class_field = dialog.locator(".field[data-pointer='/body/class']")
    expect(class_field.locator(".field-error")).to_contain_text("'class' is a required property")
    expect(class_field.locator("select")).to_have_attribute("aria-invalid", "true")
    expect(dialog.locator(".form-summary")).to_contain_text("The gateway refused the record: 1 problem")
    expect(page.locator("#announcer")).to_contain_text("/body/class")
    tab.screenshot("append-form-problem")
    history = Client(gateway, gateway.token).get(f"/episodes/{data['diabetes']}/history")
    assert len(history["records"]) == 5  # nothing was written

    class_field.locator("select").select_option(label="Doctor")
    dialog.get_by_role("button", name="Append record").click()
    expect(dialog).to_be_hidden()
    new_card = tab.card("feet examined")
    expect(new_card).to_be_visible()
    expect(new_card).to_contain_text("Doctor")
    expect(new_card).to_have_attribute("data-lane", "0")
    expect(page.locator("#detail").get_by_role("heading", name="Doctor · #5")).to_be_visible()
    history = Client(gateway, gateway.token).get(f"/episodes/{data['diabetes']}/history")
    record = history["records"][-1]["record"]
    assert record["body"] == {"class": "doctor", "notes": "Follow-up visit: feet examined, no ulcers.",
                              "observations": [{"code": {"code": "8867-4", "display": "Heart rate"}, "value": 72}]}
    assert record["author"].startswith("token:")


def test_open_and_close_an_episode(tab, world, gateway):
    from playwright.sync_api import expect
    data = seed_patient(gateway)
    page = tab.page
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(data["patient"])
    page.get_by_role("button", name="Open episode").click()
    dialog = page.get_by_role("dialog", name=f"Open an episode for {data['patient']}")
    episode = f"ep-asthma-{uuid.uuid4().hex[:6]}"
    dialog.get_by_label("Episode").fill(episode)
    kind = dialog.get_by_role("group", name="Type")
    kind.get_by_label("Entered as").select_option(label="Text")
    kind.get_by_label("Text").fill("Asthma review")
    dialog.get_by_role("textbox", name="Managing organization").fill("Clinic Example, Respiratory")
    dialog.get_by_role("button", name="Open episode").click()
    expect(dialog).to_be_hidden()
    lanes = page.locator("th.lane-head")
    expect(lanes).to_have_count(3)
    asthma = page.locator(f"th.lane-head[data-episode='{episode}']")
    expect(asthma).to_contain_text("Asthma review")
    expect(asthma.locator(".status")).to_have_text("Open")
    expect(asthma.locator(".lane-verify")).to_have_attribute("data-verify", "ok")

    asthma.get_by_role("button", name="Close episode Asthma review").click()
    dialog = page.get_by_role("dialog", name="Close Asthma review")
    dialog.get_by_role("textbox", name="Reason").fill("Symptoms controlled; back to primary care.")
    dialog.get_by_role("button", name="Close episode").click()
    expect(dialog).to_be_hidden()
    expect(asthma.locator(".status")).to_have_text("Closed")
    expect(asthma.get_by_role("button", name=re.compile("^Add record"))).to_have_count(0)
    expect(tab.card("Symptoms controlled")).to_contain_text("Episode closed")
    assert Client(gateway, gateway.token).get(f"/episodes/{episode}")["status"] == "closed"


def test_verify_badge_per_episode_and_a_broken_chain(tab, world, gateway, kubo):
    from playwright.sync_api import expect
    data = seed_patient(gateway)
    page = tab.page
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(data["patient"])
    badges = page.locator(".lane-verify")
    expect(badges.nth(0)).to_have_attribute("data-verify", "ok")
    expect(badges.nth(0)).to_contain_text("Chain verified · 5/5")
    expect(badges.nth(1)).to_contain_text("Chain verified · 4/4")
    # remove the knee X-ray record's block from Kubo behind the gateway's back
    xray, physio, closed = (data["cids"][k] for k in ("xray", "physio", "knee-closed"))
    kubo.ipfs("pin", "rm", xray, physio, closed)
    kubo.ipfs("block", "rm", xray)
    page.get_by_role("button", name="Verify Left knee injury again").click()
    expect(badges.nth(1)).to_have_attribute("data-verify", "broken")
    expect(badges.nth(1)).to_contain_text("Chain broken at #1")
    expect(badges.nth(1)).to_contain_text("the block cannot be read from Kubo")
    expect(badges.nth(0)).to_have_attribute("data-verify", "ok")


def test_patient_token_sees_only_its_own_patient(tab, world):
    from playwright.sync_api import expect
    page = tab.page
    tab.sign_in(world["tokens"]["patient"])
    expect(page.get_by_label("Patient", exact=True)).to_have_value(world["patient"])  # straight to its own
    expect(page.locator("button.rec")).to_have_count(9)
    expect(page.get_by_role("button", name="Open episode")).to_be_hidden()
    expect(page.get_by_role("button", name=re.compile("^Add record"))).to_have_count(0)
    expect(page.get_by_role("button", name="Audit log")).to_be_hidden()
    page.get_by_label("Patient", exact=True).fill(world["other"])
    page.get_by_role("button", name="Show timeline").click()
    expect(page.locator(".notice[data-state='denied']")).to_have_text("Not allowed: your token does not give access to this patient.")
    expect(page.get_by_role("alert")).to_contain_text("not allowed")
    expect(page.locator("button.rec")).to_have_count(0)
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()  # still working, not crashed
    assert not any(world["other"] in r.url for r in tab.requests if "/history" in r.url or "/verify" in r.url)


def test_auditor_reads_the_audit_log_and_no_record_bodies(tab, world):
    from playwright.sync_api import expect
    page = tab.page
    tab.sign_in(world["tokens"]["auditor"])
    tab.show_patient(world["patient"])
    lanes = page.locator("th.lane-head")
    expect(lanes).to_have_count(2)
    expect(lanes.nth(0).locator(".lane-note")).to_have_text("Records: not allowed for your token.")
    expect(lanes.nth(0).locator(".lane-verify")).to_have_attribute("data-verify", "ok")
    expect(page.locator("button.rec")).to_have_count(0)
    page.get_by_role("button", name="Audit log").click()
    expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
    page.get_by_label("Entries per page").select_option("25")
    table = page.locator("table.audit tbody tr")
    expect(table).to_have_count(25)
    expect(page.locator("#audit-page")).to_have_text("Entries 1–25")
    assert table.first.locator("td").first.inner_text() == "1"
    page.get_by_role("button", name="Next page").click()
    expect(page.locator("#audit-page")).to_have_text("Entries 26–50")
    expect(page.get_by_role("button", name="Previous page")).to_be_enabled()
    page.get_by_role("button", name="Previous page").click()
    expect(page.locator("#audit-page")).to_have_text("Entries 1–25")
    page.get_by_role("button", name="Verify log").click()
    expect(page.locator("#audit-verdict")).to_contain_text("Log intact")
    body = page.locator("table.audit").inner_html()
    assert world["patient"] not in body and 'title="ps-' in body
    tab.screenshot("audit-log")


def test_keyboard_labels_focus_and_contrast(tab, world):
    """Every control has an accessible name, records are reached and opened with the keyboard,
    the focus is visible, and text has at least 4.5:1 contrast, on each main screen."""
    from playwright.sync_api import expect
    page = tab.page
    page.goto("/ui/")
    expect(page.get_by_label("Access token")).to_be_focused()
    assert_accessible(page)
    tab.sign_in(world["tokens"]["clinician"])
    tab.show_patient(world["patient"])
    first = page.locator("button.rec").first
    first.focus()
    page.keyboard.press("ArrowDown")
    expect(tab.card("Fasting sample")).to_be_focused()
    page.keyboard.press("ArrowRight")  # the knee episode's record nearest in time
    expect(tab.card("Clinic Example, Orthopaedics")).to_be_focused()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle + ' ' + getComputedStyle(document.activeElement).outlineWidth")
    assert outline == "solid 3px", outline
    page.keyboard.press("Enter")
    expect(page.locator("#detail").get_by_role("heading", name="Episode opened · #0")).to_be_focused()
    assert_accessible(page)
    page.locator("#detail details.raw summary").click()
    page.get_by_role("button", name="Add record to Diabetes follow-up").click()
    expect(page.get_by_role("dialog")).to_be_visible()
    page.get_by_role("dialog").get_by_role("button", name="Add participant").click()
    assert_accessible(page)
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_be_hidden()
    expect(page.get_by_role("button", name="Add record to Diabetes follow-up")).to_be_focused()


PIXELS_SHA256 = """async (img) => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const g = canvas.getContext('2d');
  g.drawImage(img, 0, 0);
  const digest = await crypto.subtle.digest('SHA-256', g.getImageData(0, 0, canvas.width, canvas.height).data);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}"""

ACCESSIBILITY_CHECK = """() => {
  const visible = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
  const unlabelled = [];
  for (const el of document.querySelectorAll('input, select, textarea, button, a[href], summary, iframe, img, [tabindex]:not([tabindex="-1"])')) {
    if (!visible(el)) continue;
    const named = (el.labels && el.labels.length) || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
      || el.getAttribute('title') || (el.tagName === 'IMG' && el.hasAttribute('alt'))
      || (['BUTTON', 'A', 'SUMMARY', 'H1', 'H2', 'PRE'].includes(el.tagName) && el.textContent.trim());
    if (!named) unlabelled.push(el.outerHTML.slice(0, 120));
  }
  const parse = (c) => { const m = c.match(/[\\d.]+/g).map(Number); return { rgb: m.slice(0, 3), a: m.length > 3 ? m[3] : 1 }; };
  const lum = (rgb) => { const [r, g, b] = rgb.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c.a > 0.5) return c.rgb;
    }
    return [255, 255, 255];
  };
  const lowContrast = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || !visible(el) || el.closest('.sr-only, [hidden], dialog:not([open])')) continue;
    const style = getComputedStyle(el);
    if (style.backgroundImage !== 'none' && !el.closest('button, .badge')) continue;
    const fg = parse(style.color).rgb;
    const bg = background(el);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    if (ratio < 4.5 && !el.closest('button:disabled')) lowContrast.push(`${ratio.toFixed(2)} ${el.tagName}.${el.className}: ${node.textContent.trim().slice(0, 30)}`);
  }
  return { unlabelled, lowContrast };
}"""


def assert_accessible(page) -> None:
    found = page.evaluate(ACCESSIBILITY_CHECK)
    assert found["unlabelled"] == [], found["unlabelled"]
    assert found["lowContrast"] == [], found["lowContrast"]
