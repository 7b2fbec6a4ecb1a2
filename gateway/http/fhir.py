"""The FHIR R4 facade, ``/fhir/r4``: what a FHIR client expects of a server, over the records.

Interactions (the CapabilityStatement at ``/fhir/r4/metadata`` lists them with their search
parameters): ``read`` and ``vread`` of any resource type, ``history-instance``, ``search-type``
on EpisodeOfCare, Encounter, Observation, MedicationRequest and DiagnosticReport,
``Patient/{id}/$everything``, ``transaction`` (``POST /fhir/r4`` with a transaction Bundle),
and ``Binary/{cid}`` for attachments (``Attachment.url`` ``ipfs://<cid>``). Everything is
authenticated, authorized and audited as ``/medicon/v1`` is (``gateway.core.fhir_facade``);
errors are OperationOutcomes.

Resources are answered byte for byte as they were sent: a read's body is the resource's text,
and Bundles embed each resource's text verbatim (``exactjson.Raw``). Version and time are in
the headers (``ETag: W/"2"``, ``Last-Modified``) and in Bundle entries, never written into the
resource.
"""

from __future__ import annotations

import datetime as dt
from email.utils import format_datetime
from typing import Any

from aiohttp import web
from yarl import URL

from ..core.exactjson import Raw, render
from ..core.fhir_facade import FhirFacade, Found, Page
from ..core.fhir_ingest import Transaction
from ..core.fhir_search import SEARCH_PARAMS
from ..core.fhir_validation import FHIR_VERSION, default_validator
from ..core.records import timestamp
from ..errors import Invalid, NotFound, TooLarge
from . import attachments
from .appkeys import CONFIG, SERVICE
from .body import body_read
from .context import caller
from .errors import HTTPError
from .intercepts import idempotency_key
from .proxy import forward

PREFIX = "/fhir/r4"
FHIR_JSON = "application/fhir+json"
# The largest transaction Bundle, in records' worth of JSON.
BUNDLE_RECORDS = 16
routes = web.RouteTableDef()


def _base(request: web.Request) -> str:
    return str(request.url.origin()) + PREFIX


def _answer(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, content_type=FHIR_JSON, charset="utf-8", headers=headers)


def _facade(request: web.Request) -> FhirFacade:
    return FhirFacade(request.app[SERVICE])


def _resource_type(name: str) -> str:
    if name not in default_validator().resource_types:
        raise NotFound(f"{name[:40]!r} is not a FHIR R4 resource type")
    return name


def _http_date(recorded_at: str) -> str:
    return format_datetime(timestamp(recorded_at).astimezone(dt.timezone.utc), usegmt=True)


def _version_headers(found: Found, base: str) -> dict[str, str]:
    entry = found.entry
    return {"ETag": f'W/"{entry.version}"', "Last-Modified": _http_date(entry.recorded_at),
            "Content-Location": f"{base}/{entry.type}/{found.id}/_history/{entry.version}"}


# --- capability ---------------------------------------------------------------------------------

@routes.get(PREFIX + "/metadata")
async def metadata(request: web.Request) -> web.Response:
    await request.app[SERVICE].authorize(caller(request), "node:info")
    return _answer(render(capability_statement(_base(request))))


def capability_statement(base: str) -> dict[str, Any]:
    """What this facade does, as FHIR says a server describes itself."""
    searchable = []
    for kind, params in SEARCH_PARAMS.items():
        search_params = [{"name": p.name, "type": p.kind, "documentation": f"{p.expression}"} for p in params.values()]
        search_params += [
            {"name": "patient", "type": "reference", "documentation": "the patient of the record the resource is in"},
            {"name": "_id", "type": "token", "documentation": "the resource's id"}]
        searchable.append({
            "type": kind,
            "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "history-instance"},
                            {"code": "search-type"}],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": True,
            "searchParam": search_params,
        })
    searchable.append({
        "type": "Patient",
        "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "history-instance"}],
        "versioning": "versioned", "readHistory": True, "updateCreate": True,
        "operation": [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                       "documentation": "every resource of the patient's records the caller may read, latest "
                                        "versions, in write order; _count and the next links page it"}],
    })
    searchable.append({
        "type": "Binary", "interaction": [{"code": "read"}],
        "documentation": "Binary/<cid>: an attachment's content (Attachment.url ipfs://<cid>), as /ipfs/<cid>"})
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-01-01",
        "publisher": "Medicon Gateway",
        "kind": "instance",
        "software": {"name": "Medicon Gateway FHIR facade"},
        "implementation": {"description": "FHIR R4 over append-only, encrypted, signed records in IPFS",
                           "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json", FHIR_JSON],
        "rest": [{
            "mode": "server",
            "documentation": (
                "Resources are records' embedded FHIR resources, answered byte for byte as sent. Every other "
                "resource type is read by id (read, vread, history) but not searched. Not supported: create, update "
                "and delete outside a transaction, batch, conditional interactions, PATCH, _include, _revinclude, "
                "_sort, _summary, _elements, modifiers, chained parameters, _total; search parameters other than "
                "those listed. Comma-separated values are alternatives, repeated parameters must all match."),
            "security": {
                "cors": False,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "OAuth"}], "text": "Bearer API tokens or JWTs"}],
                "description": "As /medicon/v1: roles and patient/episode scopes; every read is audited; outside "
                               "the caller's scope is not found."},
            "resource": searchable,
            "interaction": [{"code": "transaction",
                             "documentation": "POST a transaction Bundle (POST and PUT entries) to the base URL: "
                                              "the resources become records of their episodes, all or nothing as "
                                              "far as it can be checked before the first record is appended"}],
        }],
    }


# --- transaction ----------------------------------------------------------------------------------

async def _bundle_text(request: web.Request) -> str:
    limit = request.app[CONFIG].records.max_record_size * BUNDLE_RECORDS
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"a transaction Bundle is at most {limit} bytes")
    data = bytearray()
    while len(data) <= limit and (chunk := await body_read(request, request.content.read(limit + 1 - len(data)))):
        data += chunk
    if len(data) > limit:
        raise TooLarge(f"a transaction Bundle is at most {limit} bytes")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("the Bundle is not UTF-8 JSON") from None


@routes.post(PREFIX)
@routes.post(PREFIX + "/")
async def transaction(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    text = await _bundle_text(request)
    run = Transaction(service, caller(request), max_entries=service.config.records.max_parts)
    outcomes = await run.run(text, idempotency_key(request))
    entries = []
    for outcome in outcomes:
        item = outcome.item
        response: dict[str, Any] = {"status": "201 Created" if item.created else "200 OK",
                                    "lastModified": outcome.recorded_at}
        if outcome.version is not None:
            response["location"] = f"{item.type}/{item.id}/_history/{outcome.version}"
            response["etag"] = f'W/"{outcome.version}"'
        else:
            response["location"] = f"{item.type}/{item.id}"
        entries.append({"fullUrl": f"{_base(request)}/{item.type}/{item.id}", "response": response})
    return _answer(render({"resourceType": "Bundle", "type": "transaction-response", "entry": entries}))


# --- reads --------------------------------------------------------------------------------------

@routes.get(PREFIX + "/Patient/{id}/$everything")
async def everything(request: web.Request) -> web.Response:
    page = await _facade(request).everything(caller(request), request.match_info["id"],
                                             list(request.query.items()))
    return _answer(render(_searchset(request, page)))


@routes.get(PREFIX + "/Binary/{cid}")
async def binary(request: web.Request) -> web.StreamResponse:
    """An attachment's content, read with the caller's rights (``blob:read`` on its patient)."""
    blob = await request.app[SERVICE].attachment_for(caller(request), request.match_info["cid"])
    if blob.encrypted:
        return await attachments.serve(request, blob, rpc_cat=False)
    base = request.app[CONFIG].kubo.gateway_url.rstrip("/")
    ranged = {name: request.headers[name] for name in ("Range", "If-Range") if name in request.headers}
    return await forward(request, URL(f"{base}/ipfs/{blob.cid}", encoded=True), headers=ranged)


@routes.get(PREFIX + "/{type}")
async def search(request: web.Request) -> web.Response:
    kind = _resource_type(request.match_info["type"])
    lenient = "handling=lenient" in request.headers.get("Prefer", "").replace(" ", "")
    page = await _facade(request).search(caller(request), kind, list(request.query.items()), lenient=lenient)
    return _answer(render(_searchset(request, page)))


@routes.get(PREFIX + "/{type}/{id}")
async def read(request: web.Request) -> web.Response:
    kind = _resource_type(request.match_info["type"])
    found = await _facade(request).read(caller(request), kind, request.match_info["id"])
    return _answer(found.text, headers=_version_headers(found, _base(request)))


@routes.get(PREFIX + "/{type}/{id}/_history/{version}")
async def vread(request: web.Request) -> web.Response:
    kind = _resource_type(request.match_info["type"])
    version = request.match_info["version"]
    if not version.isdigit() or len(version) > 9:
        raise NotFound(f"{kind}/{request.match_info['id'][:64]} has no version {version[:20]!r}")
    found = await _facade(request).read(caller(request), kind, request.match_info["id"], int(version))
    return _answer(found.text, headers=_version_headers(found, _base(request)))


@routes.get(PREFIX + "/{type}/{id}/_history")
async def history(request: web.Request) -> web.Response:
    kind = _resource_type(request.match_info["type"])
    versions = await _facade(request).history(caller(request), kind, request.match_info["id"])
    base = _base(request)
    entries = []
    for found in versions:
        entry = found.entry
        first = entry.version == 1
        entries.append({
            "fullUrl": f"{base}/{kind}/{found.id}",
            "resource": Raw(found.text),
            "request": {"method": "POST" if first else "PUT", "url": kind if first else f"{kind}/{found.id}"},
            "response": {"status": "201 Created" if first else "200 OK", "etag": f'W/"{entry.version}"',
                         "lastModified": entry.recorded_at},
        })
    return _answer(render({"resourceType": "Bundle", "type": "history", "total": len(entries),
                           "link": [{"relation": "self", "url": str(request.url)}], "entry": entries}))


@routes.route("*", PREFIX + "/{tail:.*}")
@routes.route("*", PREFIX)
async def unsupported(request: web.Request) -> web.Response:
    if request.method in ("PUT", "PATCH", "DELETE", "POST"):
        raise HTTPError(405, f"{request.method} is not supported here: write through a transaction Bundle "
                             f"(POST {PREFIX}); records are never removed", headers={"Allow": "GET"})
    raise NotFound(f"no such FHIR endpoint: {request.method} {request.path[:120]}")


def _searchset(request: web.Request, page: Page) -> dict[str, Any]:
    base = _base(request)
    url = request.url.with_query(page.used)
    links = [{"relation": "self", "url": str(url)}]
    if page.next_cursor is not None:
        paged = [(k, v) for k, v in page.used if k != "_cursor"] + [("_cursor", str(page.next_cursor))]
        links.append({"relation": "next", "url": str(request.url.with_query(paged))})
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"fullUrl": f"{base}/{f.entry.type}/{f.id}", "resource": Raw(f.text),
                       "search": {"mode": "match"}} for f in page.found]}

