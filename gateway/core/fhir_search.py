"""What the FHIR facade finds resources by: the search parameters of each resource type, the
values the index keeps for them, and a FHIR search read into a query of the index.

The index holds no value a reader could take for patient data in clear: codes, statuses and
references are kept as keyed pseudonyms (HMAC under the deployment's pseudonym key, which the
database never holds) of each form a FHIR token search may ask for (``system|code``, ``code``,
``system|``, ``|code``); dates as UTC ranges [low, high), in the fixed-width form
``YYYY-MM-DDTHH:MM:SS.ffffff`` so that text order is time order.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import Invalid
from ..storage.model import FhirMatch, FhirParam

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
ID_KIND = "fhir-id"          # pseudonym namespace of "Type/id"
TOKEN_KIND = "fhir-token"    # ... of codes, statuses and references
MIN_TIME = "0001-01-01T00:00:00.000000"
MAX_TIME = "9999-12-31T23:59:59.999999"
DEFAULT_COUNT, MAX_COUNT = 50, 500
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
# Parameters that shape the answer rather than select resources.
RESULT_PARAMS = ("_count", "_cursor", "_format")


@dataclass(frozen=True)
class SearchParam:
    """A search parameter of a resource type: its FHIR type (``token``, ``date``,
    ``reference``), the elements it reads, and their FHIRPath (for the CapabilityStatement)."""

    name: str
    kind: str
    elements: tuple[str, ...]
    expression: str


def _param(name: str, kind: str, *elements: str, expression: str = "") -> SearchParam:
    return SearchParam(name, kind, elements, expression)


def _status(type_: str) -> SearchParam:
    return _param("status", "token", "status", expression=f"{type_}.status")


# The R4 search parameters the facade supports, per type (names and meanings as in R4).
SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {
    "EpisodeOfCare": {p.name: p for p in (
        _status("EpisodeOfCare"),
        _param("type", "token", "type", expression="EpisodeOfCare.type"),
        _param("date", "date", "period", expression="EpisodeOfCare.period"),
    )},
    "Encounter": {p.name: p for p in (
        _status("Encounter"),
        _param("class", "token", "class", expression="Encounter.class"),
        _param("type", "token", "type", expression="Encounter.type"),
        _param("date", "date", "period", expression="Encounter.period"),
        _param("episode-of-care", "reference", "episodeOfCare", expression="Encounter.episodeOfCare"),
    )},
    "Observation": {p.name: p for p in (
        _status("Observation"),
        _param("code", "token", "code", expression="Observation.code"),
        _param("category", "token", "category", expression="Observation.category"),
        _param("date", "date", "effectiveDateTime", "effectivePeriod", "effectiveInstant",
               expression="Observation.effective"),
        _param("encounter", "reference", "encounter", expression="Observation.encounter"),
    )},
    "DiagnosticReport": {p.name: p for p in (
        _status("DiagnosticReport"),
        _param("code", "token", "code", expression="DiagnosticReport.code"),
        _param("category", "token", "category", expression="DiagnosticReport.category"),
        _param("date", "date", "effectiveDateTime", "effectivePeriod", expression="DiagnosticReport.effective"),
        _param("encounter", "reference", "encounter", expression="DiagnosticReport.encounter"),
    )},
    "MedicationRequest": {p.name: p for p in (
        _status("MedicationRequest"),
        _param("intent", "token", "intent", expression="MedicationRequest.intent"),
        _param("code", "token", "medicationCodeableConcept",
               expression="(MedicationRequest.medication as CodeableConcept)"),
        _param("authoredon", "date", "authoredOn", expression="MedicationRequest.authoredOn"),
        _param("encounter", "reference", "encounter", expression="MedicationRequest.encounter"),
    )},
}
# Every searchable type also takes these (the record's patient; the resource's id).
COMMON_PARAMS = {"patient": "reference", "_id": "token"}


# --- the values a resource is found by -------------------------------------------------------

def index_params(resource: dict[str, Any], pseudonym: Callable[[str], str]) -> tuple[FhirParam, ...]:
    """The values of ``resource``'s search parameters, codes and references pseudonymised."""
    params = SEARCH_PARAMS.get(resource.get("resourceType"), {})
    out: list[FhirParam] = []
    for param in params.values():
        for element in param.elements:
            value = resource.get(element)
            if value is None:
                continue
            if param.kind == "token":
                out += [FhirParam(param.name, token=pseudonym(form)) for form in sorted(set(_token_forms(value)))]
            elif param.kind == "reference":
                out += [FhirParam(param.name, token=pseudonym(ref)) for ref in sorted(set(_references(value)))]
            else:
                found = _date_value(value)
                if found is not None:
                    out.append(FhirParam(param.name, low=found[0], high=found[1]))
    return tuple(out)


def _codings(value: Any) -> Iterator[tuple[str | None, str]]:
    """(system, code) of a code, a Coding, a CodeableConcept, or a list of them."""
    if isinstance(value, str):
        yield None, value
    elif isinstance(value, list):
        for item in value:
            yield from _codings(item)
    elif isinstance(value, dict):
        if isinstance(value.get("code"), str):
            system = value.get("system")
            yield (system if isinstance(system, str) else None), value["code"]
        for coding in value.get("coding") or ():
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                system = coding.get("system")
                yield (system if isinstance(system, str) else None), coding["code"]


def _token_forms(value: Any) -> Iterator[str]:
    """Each form a token search may ask for: system|code, code, system| (or |code)."""
    for system, code in _codings(value):
        yield code
        if system:
            yield f"{system}|{code}"
            yield f"{system}|"
        else:
            yield f"|{code}"


_REFERENCE = re.compile(r"(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")


def reference_key(text: str, default_type: str | None = None) -> str | None:
    """``Type/id`` of a reference (relative, absolute, versioned), or of a bare id when the
    type is known; None if it names no resource by type and id."""
    match = _REFERENCE.fullmatch(text)
    if match:
        return f"{match[1]}/{match[2]}"
    if default_type and FHIR_ID.fullmatch(text):
        return f"{default_type}/{text}"
    return None


def _references(value: Any) -> Iterator[str]:
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict) and isinstance(item.get("reference"), str):
            key = reference_key(item["reference"])
            if key:
                yield key


def _date_value(value: Any) -> tuple[str, str] | None:
    if isinstance(value, str):
        return date_range(value)
    if isinstance(value, dict):  # a Period: open ends reach the beginning or the end of time
        start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
        if start is None and end is None:
            return None
        return (start[0] if start else MIN_TIME), (end[1] if end else MAX_TIME)
    return None


_DATE = re.compile(r"(?P<y>[0-9]{4})(?:-(?P<m>[0-9]{2})(?:-(?P<d>[0-9]{2})"
                   r"(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?P<f>\.[0-9]+)?)?"
                   r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?")


def date_range(text: str) -> tuple[str, str] | None:
    """The UTC range [low, high) a FHIR date, dateTime or instant stands for, by its precision:
    ``2024`` is the whole year, ``2024-05-03T10:00:00+02:00`` one second. A time without a
    zone, and a date (FHIR gives it none), are taken as UTC. None if ``text`` is not one."""
    match = _DATE.fullmatch(text)
    if not match:
        return None
    year, month, day = int(match["y"]), int(match["m"] or 1), int(match["d"] or 1)
    try:
        if match["H"] is None:
            low = dt.datetime(year, month, day)
            high = (_add_months(low, 12) if match["m"] is None else _add_months(low, 1) if match["d"] is None
                    else low + dt.timedelta(days=1))
        else:
            second = int(match["S"] or 0)
            leap = second == 60
            low = dt.datetime(year, month, day, int(match["H"]), int(match["M"]), 59 if leap else second)
            fraction = match["f"] or ""
            digits = min(len(fraction) - 1, 6) if fraction else 0
            if digits:
                low = low.replace(microsecond=int(fraction[1:7].ljust(6, "0")))
            if leap:
                low = low.replace(microsecond=999999)
            step = (dt.timedelta(minutes=1) if match["S"] is None else
                    dt.timedelta(microseconds=10 ** (6 - digits)) if not leap else dt.timedelta(microseconds=1))
            high = low + step
            if match["tz"] and match["tz"] != "Z":
                sign = 1 if match["tz"][0] == "+" else -1
                offset = dt.timedelta(hours=int(match["tz"][1:3]), minutes=int(match["tz"][4:6]))
                low, high = low - sign * offset, high - sign * offset
    except (ValueError, OverflowError):
        return None
    return _text(low), (_text(high) if high is not None else MAX_TIME)


def _add_months(moment: dt.datetime, months: int) -> dt.datetime | None:
    total = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(total, 12)
    return None if year > 9999 else moment.replace(year=year, month=month + 1)


def _text(moment: dt.datetime) -> str:
    return (f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
            f"{moment.second:02d}.{moment.microsecond:06d}")


# --- a FHIR search, read ---------------------------------------------------------------------

@dataclass
class Search:
    """A search as the facade runs it: the patients it names (clear ids, for authorization;
    None: any), the ids (``_id``), the conditions on other parameters, the page asked for,
    and the parameters used (for the Bundle's ``self`` link)."""

    patients: tuple[str, ...] | None = None
    ids: tuple[str, ...] | None = None
    all_of: list[tuple[FhirMatch, ...]] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    cursor: int = 0
    used: list[tuple[str, str]] = field(default_factory=list)


def parse_search(resource_type: str | None, pairs: list[tuple[str, str]], pseudonym: Callable[[str], str], *,
                 lenient: bool = False, params: dict[str, SearchParam] | None = None) -> Search:
    """A FHIR search's query parameters (``pairs``, in order) for ``resource_type`` (None:
    ``$everything``, which takes only the paging parameters). Repeated parameters must all
    match (and), comma-separated values are alternatives (or). An unknown or unsupported
    parameter is ``Invalid`` (400), unless ``lenient`` (``Prefer: handling=lenient``): then it
    is left out of the search and of the ``self`` link."""
    known = params if params is not None else SEARCH_PARAMS.get(resource_type or "", {})
    search = Search()
    for name, value in pairs:
        base, _, modifier = name.partition(":")
        if base == "_count":
            search.count = _integer(name, value, 1, MAX_COUNT)
        elif base == "_cursor":
            search.cursor = _integer(name, value, 0, 2**62)
        elif base == "_format":
            if value not in ("json", "application/json", "application/fhir+json"):
                raise Invalid("_format: this server answers in JSON only (json, application/fhir+json)")
        elif modifier or (resource_type is None) or (base not in known and base not in COMMON_PARAMS):
            if lenient:
                continue
            raise Invalid(_unsupported(resource_type, name, known))
        elif base == "patient":
            patients = [_patient_id(v) for v in _values(value)]
            search.patients = tuple(patients) if search.patients is None else \
                tuple(p for p in search.patients if p in patients)
        elif base == "_id":
            ids = _values(value)
            if not all(FHIR_ID.fullmatch(i) for i in ids):
                raise Invalid("_id: expected FHIR ids (A-Z a-z 0-9 - ., at most 64)")
            search.ids = tuple(ids) if search.ids is None else tuple(i for i in search.ids if i in ids)
        else:
            search.all_of.append(_matches(known[base], value, pseudonym))
        search.used.append((name, value))
    return search


_PATIENT = re.compile(r"(?:.*/)?(?:Patient/)?([A-Za-z0-9._:-]{1,128})")


def _patient_id(value: str) -> str:
    """The patient a ``patient`` value names: ``Patient/<id>``, an absolute URL to it, or the
    bare id (a Medicon patient identifier, which may hold ``:`` and ``_`` beyond FHIR's id)."""
    match = _PATIENT.fullmatch(value)
    if not match or (value.count("/") and not re.search(r"(?:^|/)Patient/[^/]+$", value)):
        raise Invalid("patient: expected Patient/<id> or <id>")
    return match[1]


def _integer(name: str, value: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", value) or not low <= int(value) <= high:
        raise Invalid(f"{name}: expected a whole number from {low} to {high}")
    return int(value)


def _unsupported(resource_type: str | None, name: str, known: dict[str, SearchParam]) -> str:
    if resource_type is None:
        return f"{name[:40]}: $everything takes only _count (and the paging links' _cursor)"
    if ":" in name:
        return f"{name[:40]}: search modifiers are not supported"
    names = ", ".join(sorted([*known, *COMMON_PARAMS, *RESULT_PARAMS]))
    return f"{name[:40]}: not a search parameter this server supports on {resource_type} (supported: {names})"


def _values(value: str) -> list[str]:
    """Comma-separated alternatives (``\\,`` is a comma inside a value)."""
    parts = re.split(r"(?<!\\),", value)
    return [p.replace("\\,", ",") for p in parts]


def _matches(param: SearchParam, value: str, pseudonym: Callable[[str], str]) -> tuple[FhirMatch, ...]:
    found = []
    for item in _values(value):
        if not item:
            raise Invalid(f"{param.name}: empty value")
        if param.kind == "token":
            found.append(FhirMatch(param.name, tokens=(pseudonym(item),)))
        elif param.kind == "reference":
            key = reference_key(item)
            if key is None:
                raise Invalid(f"{param.name}: expected Type/id")
            found.append(FhirMatch(param.name, tokens=(pseudonym(key),)))
        else:
            prefix, text = (item[:2], item[2:]) if item[:2] in DATE_PREFIXES else ("eq", item)
            span = date_range(text)
            if span is None:
                raise Invalid(f"{param.name}: expected a FHIR date or dateTime, with an optional prefix "
                              f"({', '.join(DATE_PREFIXES)})")
            found.append(FhirMatch(param.name, prefix=prefix, low=span[0], high=span[1]))
    return tuple(found)
