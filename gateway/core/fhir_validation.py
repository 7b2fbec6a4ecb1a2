"""Validation of FHIR R4 (4.0.1) resources embedded in records.

Records may carry FHIR resources anywhere in their body (every object with a ``resourceType``).
This module checks each against FHIR R4 and names every problem by JSON pointer, so the gateway
can answer a clear 400 ("Observation at /body/fhir/0: /body/fhir/0/status: 'done' is not one
of [...]") instead of storing a resource other FHIR software will refuse.

What is checked, and from where (both shipped in ``gateway/core/fhir_r4/``, rebuilt by
``scripts/build_fhir_r4_data.py``; see ``gateway/core/fhir_r4/README.md``):

- HL7's official R4 JSON Schema (``fhir.schema.json``, draft-06), run by ``jsonschema``: element
  names and types (unknown elements are refused), the primitive formats (date, dateTime, instant,
  id, uri, code... with the spec's regexes, matched whole), codes with a *required* binding
  (status, comparator, gender...), contained and Bundle resources.
- What that schema cannot say, derived from the R4 StructureDefinitions: mandatory elements
  (``status`` or its ``_status`` extension), at most one ``value[x]`` (and one when mandatory),
  and the resource types a Reference may point at (``subject``: Patient, Group, ...).
- The form of ``Reference.reference`` (``Type/id``, an absolute FHIR URL, ``urn:uuid:``,
  ``urn:oid:`` or ``#contained``) and whole-number JSON for integer, positiveInt and
  unsignedInt.

Not checked: FHIRPath invariants, profiles, extensible/preferred bindings (no terminology
server), that a ``#contained`` reference exists.

Numbers may be ``int``, ``float`` or ``decimal.Decimal`` (the gateway parses JSON decimals as
Decimal to keep ``1.00`` as written); an integer element needs a number written without a
decimal point (``int`` or an integral Decimal such as ``Decimal("5")``).

Messages never repeat free-text values (names, identifiers); they show a code only where the
element is a code with a fixed set of values.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from jsonschema import Draft6Validator, ValidationError
from jsonschema.validators import extend

from .schemas import is_calendar_date, whole_pattern

DATA_DIR = Path(__file__).resolve().parent / "fhir_r4"
SCHEMA_ID = "http://hl7.org/fhir/json-schema/4.0"
FHIR_VERSION = "4.0.1"

_INT32 = (-(2**31), 2**31 - 1)
_INTEGER_RANGES = {"integer": _INT32, "positiveInt": (1, _INT32[1]), "unsignedInt": (0, _INT32[1])}
_ID = r"[A-Za-z0-9\-.]{1,64}"
_REFERENCE = re.compile(
    r"(?:(?P<base>https?://[^\s/]+(?:/[^\s/]+)*?)/)?"  # an optional absolute base: a FHIR server
    rf"(?P<type>[A-Z][A-Za-z]+)/(?P<id>{_ID})(?:/_history/{_ID})?"
)
_LOCAL = re.compile(rf"#(?:{_ID})?")
_URN = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}|urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+")
_SHORT = 64


Problem = tuple[str, str]  # (JSON pointer, message)


class FhirR4Validator:
    """The R4 JSON Schema plus the StructureDefinition rules, loaded once (about 0.1 s)."""

    def __init__(self, data_dir: Path = DATA_DIR) -> None:
        schema = _read_gz(data_dir / "fhir.schema.json.gz")
        structure = _read_gz(data_dir / "structure.json.gz")
        if schema.get("id") != SCHEMA_ID or structure.get("fhirVersion") != FHIR_VERSION:
            raise ValueError(f"{data_dir}: not the FHIR R4 {FHIR_VERSION} data")
        definitions = schema["definitions"]
        self.resource_types = frozenset(schema["discriminator"]["mapping"])
        self._definitions = definitions
        # Dispatch on resourceType instead of the schema's 146-way oneOf: one branch is
        # validated, and its errors are the ones reported.
        definitions["ResourceList"] = {"fhirResource": True}
        schema.pop("oneOf", None)
        schema.pop("$schema", None)  # else jsonschema may swap in its stock draft-06 class
        schema["$ref"] = "#/definitions/ResourceList"
        for name, rules in structure["definitions"].items():
            definitions[name]["fhirRules"] = rules
        definitions["Reference"]["fhirReference"] = True
        for definition in definitions.values():
            if "properties" in definition:
                # The schema leaves "type" out of complex types: a string would pass as a
                # CodeableConcept, and an array as a Reference.
                definition["type"] = "object"
        self._names = {id(d): name for name, d in definitions.items()}
        # Primitive name(s) by pattern, for messages ("uri or url or canonical" share one).
        self._primitive_of_pattern: dict[str, str] = {}
        for name, d in definitions.items():
            if name[:1].islower() and "pattern" in d:
                known = self._primitive_of_pattern.get(d["pattern"])
                self._primitive_of_pattern[d["pattern"]] = f"{known} or {name}" if known else name
        # The schema copies each primitive's pattern and type into the elements that use it
        # (valueInteger: {"type": "number", "pattern": ...}), and a pattern does not apply to a
        # number: mark every integer and decimal element for the numeric checks.
        for node in _element_schemas(definitions):
            primitive = self._primitive_of_pattern.get(node.get("pattern"))
            if primitive in _INTEGER_RANGES:
                node["fhirInteger"] = primitive
            elif primitive == "decimal":
                node["fhirDecimal"] = True
            elif primitive in ("date", "dateTime", "instant"):
                node["fhirCalendar"] = True
        validator_class = extend(
            Draft6Validator,
            {
                "pattern": _string_pattern,
                "fhirResource": self._resource,
                "fhirRules": self._rules,
                "fhirInteger": _integer,
                "fhirDecimal": _decimal,
                "fhirCalendar": _calendar,
                "fhirReference": self._reference,
            },
        )
        _inline_definitions(definitions)
        self._validator = validator_class(definitions["ResourceList"])

    def is_resource_type(self, value: Any) -> bool:
        """Whether a JSON value names an R4 resource type (only a string can: an object or an
        array is no set member, and must not be asked as one)."""
        return isinstance(value, str) and value in self.resource_types

    def validate(self, resource: Any) -> list[Problem]:
        """Every problem of ``resource`` as (JSON pointer inside the resource, message)."""
        found = [problem for error in self._validator.iter_errors(resource) for problem in self._problems(error)]
        found.sort(key=lambda problem: (_path_key(problem[0]), problem[1]))
        return [(_pointer(path), message) for path, message in found]

    def _resource(self, validator, _value, instance, _schema) -> Iterator[ValidationError]:
        if not isinstance(instance, dict):
            yield ValidationError(f"a FHIR resource is a JSON object, got {_json_type(instance)}")
            return
        if "resourceType" not in instance:
            yield ValidationError("resourceType is required", path=["resourceType"])
            return
        resource_type = instance["resourceType"]
        if not isinstance(resource_type, str):
            yield ValidationError(f"resourceType must be a string, got {_json_type(resource_type)}",
                                  path=["resourceType"])
            return
        if resource_type not in self.resource_types:
            yield ValidationError(
                f"{_short(resource_type)} is not a FHIR R4 resource type", path=["resourceType"]
            )
            return
        yield from validator.descend(instance, self._definitions[resource_type])

    def _reference(self, _validator, _value, instance, _schema) -> Iterator[ValidationError]:
        if not isinstance(instance, dict) or not isinstance(instance.get("reference"), str):
            return
        text = instance["reference"]
        match = _REFERENCE.fullmatch(text)
        if match and match["type"] not in self.resource_types:
            yield ValidationError(f"{_short(match['type'])} is not a FHIR R4 resource type", path=["reference"])
        elif not (match or _LOCAL.fullmatch(text) or _URN.fullmatch(text)):
            yield ValidationError(
                "not a FHIR reference: expected Type/id (e.g. Patient/p-1), an absolute FHIR URL, "
                "urn:uuid:..., urn:oid:... or #contained-id",
                path=["reference"],
            )

    def _rules(self, _validator, rules, instance, schema) -> Iterator[ValidationError]:
        if not isinstance(instance, dict):
            return
        for name in rules.get("required", ()):
            if name in schema.get("required", ()):
                continue  # the JSON Schema reports it
            if name not in instance and "_" + name not in instance:
                yield ValidationError("required by FHIR R4", path=[name])
        for choice in rules.get("choices", ()):
            present = sorted({n for n in choice["names"] if n in instance or "_" + n in instance})
            if len(present) > 1:
                yield ValidationError(f"only one {choice['base']}[x] is allowed, found {', '.join(present)}", path=[present[1]])
            elif not present and choice["min"] >= 1:
                yield ValidationError(
                    f"one of {', '.join(choice['names'])} is required by FHIR R4", path=[choice["base"] + "[x]"]
                )
        for name, targets in rules.get("references", {}).items():
            value = instance.get(name)
            items = value if isinstance(value, list) else [value]
            for index, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("reference"), str):
                    continue
                match = _REFERENCE.fullmatch(item["reference"])
                if match and match["type"] in self.resource_types and match["type"] not in targets:
                    where = [name, index, "reference"] if isinstance(value, list) else [name, "reference"]
                    yield ValidationError(
                        f"{match['type']} is not allowed here; FHIR R4 allows {', '.join(targets)}", path=where
                    )

    def _problems(self, error: ValidationError) -> Iterator[tuple[list, str]]:
        path = list(error.absolute_path)
        keyword = str(error.validator)
        where = self._names.get(id(error.schema), "element")
        if keyword == "additionalProperties":
            known = error.schema.get("properties", {})
            for name in error.instance:
                if name not in known:
                    yield path + [name], f"unknown element: FHIR R4 {where} has no {_short(name)}"
            return
        if keyword == "required":
            missing = [n for n in error.validator_value if n not in error.instance]
            name = next((n for n in missing if error.message.startswith(repr(n))), None)
            if name is not None:
                yield path + [name], f"required by FHIR R4 {where}"
                return
        yield path, self._message(error, keyword)

    def _message(self, error: ValidationError, keyword: str) -> str:
        instance = error.instance
        if keyword == "type":
            expected = error.validator_value
            expected = " or ".join(expected) if isinstance(expected, list) else expected
            return f"expected {expected}, got {_json_type(instance)}"
        if keyword == "enum":
            allowed = ", ".join(repr(v) for v in error.validator_value)
            return f"{_short(instance)} is not one of the codes allowed here: {allowed}"
        if keyword == "const":
            return f"must be {error.validator_value!r}"
        if keyword == "pattern":
            primitive = self._primitive_of_pattern.get(error.validator_value)
            if primitive is not None:
                return f"not a valid FHIR {primitive}"
            return "does not match the required format"
        if keyword.startswith("fhir"):
            return error.message
        return f"fails {keyword} {_short(error.validator_value)}"


@lru_cache(maxsize=1)
def default_validator() -> FhirR4Validator:
    """The shared validator, built on first use."""
    return FhirR4Validator()


def validate_resource(resource: Any) -> list[Problem]:
    """Every FHIR R4 problem of one resource: (JSON pointer inside it, message), sorted."""
    return default_validator().validate(resource)


def find_resources(document: Any, pointer: str = "") -> Iterator[tuple[str, dict]]:
    """Every embedded FHIR resource (an object with ``resourceType``) and its JSON pointer.

    A resource's own contents (contained resources, Bundle entries) are not yielded: they are
    validated as part of it."""
    if isinstance(document, dict):
        if "resourceType" in document:
            yield pointer, document
            return
        for key, value in document.items():
            yield from find_resources(value, f"{pointer}/{_escape(str(key))}")
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from find_resources(value, f"{pointer}/{index}")


def validate_embedded(document: Any, pointer: str = "") -> list[Problem]:
    """Every problem of every resource embedded in ``document`` (e.g. a record body at
    ``/body``), with pointers from the document's root and messages naming the resource."""
    validator = default_validator()
    problems: list[Problem] = []
    for at, resource in find_resources(document, pointer):
        name = resource.get("resourceType")
        label = name if validator.is_resource_type(name) else "resource"
        for inner, message in validator.validate(resource):
            problems.append((at + inner, f"FHIR R4 {label} at {at or '/'}: {message}"))
    return problems


# --- keywords ---------------------------------------------------------------------------------


def _string_pattern(validator, pattern, instance, schema) -> Iterator[ValidationError]:
    # The schema gives patterns to booleans and numbers too; those are the type's business.
    if schema.get("type", "string") == "string":
        yield from whole_pattern(validator, pattern, instance, schema)


def _integer(_validator, kind, instance, _schema) -> Iterator[ValidationError]:
    if isinstance(instance, bool) or not isinstance(instance, (int, float, Decimal)):
        return  # the type keyword reports it
    integral = isinstance(instance, int) or (
        isinstance(instance, Decimal) and instance.is_finite() and instance.as_tuple().exponent >= 0
    )
    if not integral:
        yield ValidationError(f"a FHIR {kind} is a whole number written without a decimal point")
        return
    low, high = _INTEGER_RANGES[kind]
    if not low <= instance <= high:
        yield ValidationError(f"a FHIR {kind} is between {low} and {high}")


def _decimal(_validator, _value, instance, _schema) -> Iterator[ValidationError]:
    if isinstance(instance, (float, Decimal)):
        if not (instance.is_finite() if isinstance(instance, Decimal) else math.isfinite(instance)):
            yield ValidationError("a FHIR decimal is a finite number")


# --- helpers ----------------------------------------------------------------------------------


def _calendar(_validator, _value, instance, _schema) -> Iterator[ValidationError]:
    if not is_calendar_date(instance):
        yield ValidationError("not a valid FHIR date: that day does not exist")


_DEFINITION = "#/definitions/"


def _inline_definitions(definitions: dict) -> None:
    """Put each definition itself where the schema says ``{"$ref": "#/definitions/X"}``
    (about 10,000 places; draft-06 ignores a ``$ref``'s siblings, here only descriptions). The
    schema becomes a graph with cycles (Extension holds Extensions) that ``jsonschema`` walks as
    far as the instance goes, without resolving a reference at each step (over half the time
    of validating a resource: the bench's synthetic FHIR records, 1.8 → 0.8 ms each). Every
    reference must be of that form: one left over would need a resolver the validator no
    longer has."""
    def resolved(schema: Any) -> Any:
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if ref is None:
            if isinstance(schema, dict):
                inline(schema)
            return schema
        if not (isinstance(ref, str) and ref.startswith(_DEFINITION) and ref[len(_DEFINITION):] in definitions):
            raise ValueError(f"FHIR R4 schema: a reference the gateway cannot inline: {ref!r}")
        return definitions[ref[len(_DEFINITION):]]

    def inline(schema: dict) -> None:
        for key, value in schema.items():
            if key in ("properties", "patternProperties") and isinstance(value, dict):
                for name, sub in value.items():
                    value[name] = resolved(sub)
            elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
                schema[key] = resolved(value)
            elif key in ("items", "allOf", "anyOf", "oneOf") and isinstance(value, list):
                value[:] = [resolved(sub) for sub in value]

    for definition in definitions.values():
        if "$ref" in definition:
            raise ValueError("FHIR R4 schema: a definition that is only a reference")
        inline(definition)


def _element_schemas(definitions: dict) -> Iterator[dict]:
    for definition in definitions.values():
        yield definition
        for prop in definition.get("properties", {}).values():
            yield prop
            if isinstance(prop.get("items"), dict):
                yield prop["items"]


def _read_gz(path: Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, (float, Decimal)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHORT else text[:_SHORT] + "...(truncated)"


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer(path: Iterable[str | int]) -> str:
    return "".join("/" + _escape(str(p)) for p in path)


def _path_key(path: Iterable[str | int]) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path)
