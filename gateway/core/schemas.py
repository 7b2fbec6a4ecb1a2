"""Record schemas: load JSON Schema (2020-12) folders, validate records against their kind.

A record names its kind in ``schema`` (a schema ``$id``); ``SchemaRegistry.validate`` checks it
against that kind and returns every violation, each with the JSON pointer of the failing field
and the ``$id`` of the schema whose keyword failed. Schemas marked ``"x-medicon-abstract": true``
(the envelope, the shared definitions) can be ``$ref``'d but are not record kinds.

``$ref``s resolve only among the loaded files: nothing is ever fetched, and a ``$ref`` to an
unknown URI fails at load time. Validators are built once per kind, at load time.

Most records are valid, and ``jsonschema`` takes about half a millisecond to say so; so each
kind also gets a compiled validator (``jsonschema-rs``) that only answers valid or not, with
this module's own ``pattern`` (Python's ``re``, ECMA's final ``$``) and format checks plugged in,
so that both read a schema the same way. A record it finds valid is valid; any other is judged
(and its violations named) by ``jsonschema``, whose verdict stands. The compiled validators are
used only when every loaded schema keeps to keywords whose meaning the two share (see
``FAST_KEYWORDS``); otherwise ``jsonschema`` alone validates.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urljoin

import jsonschema_rs
import referencing.exceptions
from jsonschema import Draft202012Validator, FormatChecker, ValidationError
from jsonschema.exceptions import SchemaError as _JsonSchemaError
from jsonschema.validators import extend
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DEFAULT_SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
ENVELOPE_ID = "https://medicon.example/schemas/envelope/v1"
ABSTRACT = "x-medicon-abstract"
# Folders with this name hold example records, not schemas, and are not loaded.
EXAMPLES_DIR = "examples"
_REPR_LIMIT = 200


class SchemaError(Exception):
    """A schema folder cannot be loaded: bad JSON, invalid schema, duplicate $id, bad $ref."""


@dataclass(frozen=True)
class Violation:
    pointer: str  # JSON pointer into the record, "" for the root, e.g. "/body/class"
    message: str
    schema_id: str  # $id of the schema resource whose keyword failed
    keyword: str  # the failing keyword, e.g. "enum", "required"

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.message} (schema {self.schema_id})"


# --- format checking -----------------------------------------------------------------------

_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt]"  # full-date "T"
    r"[0-9]{2}:[0-9]{2}:([0-9]{2})(\.[0-9]+)?"  # partial-time (group 1: seconds)
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"  # time-offset
)


def is_rfc3339_datetime(value: object) -> bool:
    """RFC 3339 ``date-time`` (offset required), checked for real calendar/clock values."""
    if not isinstance(value, str):
        return True  # format only constrains strings
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    text = value.upper().replace("Z", "+00:00")
    if match.group(1) == "60":  # leap second: datetime has no :60, check the rest
        text = text[: match.start(1)] + "59" + text[match.end(1) :]
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


_FULL_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")


def is_calendar_date(value: object) -> bool:
    """False for a string whose date part names a day that does not exist (2023-02-29).

    Format ``fhir-date`` of the v2 schemas: FHIR says "Dates SHALL be valid dates" but its
    regexes allow 31 days in every month. Partial dates (2024, 2024-05) pass: the FHIR regex
    beside this format decides what shapes are allowed."""
    if not isinstance(value, str):
        return True
    match = _FULL_DATE.match(value)
    if match is None:
        return True
    try:
        date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return False
    return True


def _format_checker() -> FormatChecker:
    # Our own date-time check, whether or not rfc3339-validator is installed: jsonschema
    # silently skips formats it has no checker for, and the behaviour must not depend on it.
    checker = FormatChecker(formats=())
    checker.checkers = dict(Draft202012Validator.FORMAT_CHECKER.checkers)
    checker.checks("date-time")(is_rfc3339_datetime)
    checker.checks("fhir-date")(is_calendar_date)
    return checker


FORMAT_CHECKER = _format_checker()


@lru_cache(maxsize=None)
def compiled_pattern(pattern: str) -> re.Pattern:
    """``pattern`` with ECMA-262 semantics for a final ``$`` (the end of the string): in Python
    ``$`` also matches before a final newline, so "id\\n" would pass ``^[a-z]+$``."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def whole_pattern(_validator, pattern, instance, _schema) -> Iterator[ValidationError]:
    """The ``pattern`` keyword, with ``compiled_pattern``."""
    if isinstance(instance, str) and not compiled_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _is_integer(checker, instance) -> bool:
    """JSON Schema's integer: any number with a zero fractional part. Records' decimals come
    in as ``Decimal`` (to keep ``5.0`` as written), which jsonschema would not count."""
    if isinstance(instance, Decimal):
        return instance.is_finite() and instance == instance.to_integral_value()
    return Draft202012Validator.TYPE_CHECKER.is_type(instance, "integer")


_RecordValidator = extend(Draft202012Validator, {"pattern": whole_pattern},
                          type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


# --- the compiled validators ---------------------------------------------------------------

# Keywords whose meaning jsonschema and jsonschema-rs share for JSON values (pattern and format
# are this module's own in both); a schema using any other keyword is validated by jsonschema
# alone. (Not here, for instance: patternProperties, whose regex dialect would decide which
# properties a subschema applies to; multipleOf, which jsonschema computes in floats.)
FAST_KEYWORDS = frozenset({
    "$schema", "$id", "$ref", "$defs", "$comment", "$anchor", "title", "description", "default",
    "examples", "deprecated", "readOnly", "writeOnly", "type", "enum", "const", "properties",
    "additionalProperties", "required", "minProperties", "maxProperties", "dependentRequired",
    "dependentSchemas", "items", "prefixItems", "minItems", "maxItems", "allOf", "anyOf", "oneOf",
    "not", "if", "then", "else", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "format",
})
_SUBSCHEMA = ("additionalProperties", "items", "not", "if", "then", "else")
_SUBSCHEMA_MAPS = ("properties", "$defs", "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")


def _keywords(schema: Any) -> set[str]:
    """Every keyword used in a schema and its subschemas (not the names of properties)."""
    if not isinstance(schema, dict):
        return set()
    found = {k for k in schema if not k.startswith("x-")}
    for k in _SUBSCHEMA:
        found |= _keywords(schema.get(k))
    for k in _SUBSCHEMA_MAPS:
        for sub in (schema.get(k) or {}).values() if isinstance(schema.get(k), dict) else ():
            found |= _keywords(sub)
    for k in _SUBSCHEMA_LISTS:
        for sub in schema.get(k) or () if isinstance(schema.get(k), list) else ():
            found |= _keywords(sub)
    return found


class _Pattern:
    """``pattern`` for jsonschema-rs, with the same ``compiled_pattern`` as ``whole_pattern``."""

    def __init__(self, parent_schema: dict, value: str, schema_path: list) -> None:
        self._pattern = compiled_pattern(value)

    def validate(self, instance: Any) -> None:
        if isinstance(instance, str) and not self._pattern.search(instance):
            raise ValueError("does not match")


def _fast_validators(schemas: dict[str, dict], kinds: Iterable[str]) -> dict[str, Any]:
    """A compiled validator per kind, or none if a schema uses a keyword outside
    ``FAST_KEYWORDS`` (or jsonschema-rs cannot compile one)."""
    if any(_keywords(schema) - FAST_KEYWORDS for schema in schemas.values()):
        return {}
    formats = {name: (lambda value, name=name: FORMAT_CHECKER.conforms(value, name))
               for name in FORMAT_CHECKER.checkers}
    try:
        registry = jsonschema_rs.Registry(list(schemas.items()))
        return {kind: jsonschema_rs.Draft202012Validator(
                    schemas[kind], registry=registry, formats=formats, validate_formats=True,
                    ignore_unknown_formats=True, keywords={"pattern": _Pattern}, retriever=_refuse_retrieval)
                for kind in kinds}
    except Exception:  # a schema jsonschema-rs reads differently: jsonschema alone, as before
        return {}


# --- the registry --------------------------------------------------------------------------


def _refuse_retrieval(uri: str) -> Resource:
    raise referencing.exceptions.NoSuchResource(ref=uri)


class SchemaRegistry:
    """The loaded schemas, by ``$id``, and one compiled validator per record kind."""

    def __init__(self, schemas: dict[str, dict], files: dict[str, Path]) -> None:
        self._schemas = schemas
        # Every file is 2020-12 (checked at load). A "$schema" in a $ref'd file would make
        # jsonschema switch to its stock validator for that dialect, without our pattern
        # keyword: validate with shallow copies that leave it out.
        runnable = {sid: {k: v for k, v in s.items() if k != "$schema"} for sid, s in schemas.items()}
        self._registry = Registry(retrieve=_refuse_retrieval).with_resources(
            (sid, DRAFT202012.create_resource(s)) for sid, s in runnable.items()
        ).crawl()
        # id(subschema dict) -> $id of its schema resource, to name the schema of a violation.
        self._owner: dict[int, str] = {}
        for sid, schema in runnable.items():
            self._index(DRAFT202012.create_resource(schema), sid, files[sid])
        self._validators = {
            sid: _RecordValidator(schema, registry=self._registry, format_checker=FORMAT_CHECKER)
            for sid, schema in runnable.items()
            if not schema.get(ABSTRACT)
        }
        self._fast = _fast_validators(schemas, self._validators)

    @classmethod
    def load(cls, *dirs: Path) -> SchemaRegistry:
        """Every ``*.json`` under each folder (recursively, except in ``examples/`` folders).

        Folders merge: a later folder may ``$ref`` schemas of an earlier one (or vice versa),
        but an ``$id`` defined twice is an error naming both files."""
        schemas: dict[str, dict] = {}
        files: dict[str, Path] = {}
        for directory in dirs:
            directory = Path(directory)
            if not directory.is_dir():
                raise SchemaError(f"{directory}: not a schema folder")
            for path in sorted(directory.rglob("*.json")):
                if EXAMPLES_DIR in path.relative_to(directory).parts[:-1]:
                    continue
                schema = _read_schema(path)
                sid = schema["$id"]
                if sid in files:
                    raise SchemaError(f"duplicate $id {sid!r} in {files[sid]} and {path}")
                schemas[sid], files[sid] = schema, path
        return cls(schemas, files)

    def _index(self, resource: Resource, base: str, path: Path) -> None:
        """Record which resource owns each subschema; fail on a $ref that does not resolve."""
        if resource.id() is not None:
            base = urljoin(base, resource.id())
        contents = resource.contents
        if isinstance(contents, dict):
            self._owner[id(contents)] = base
            for keyword in ("$ref", "$dynamicRef"):
                ref = contents.get(keyword)
                if not isinstance(ref, str):
                    continue
                try:
                    self._registry.resolver(base_uri=base).lookup(ref)
                except referencing.exceptions.Unresolvable as error:
                    raise SchemaError(
                        f"{path}: {keyword} {ref!r} does not resolve: {urljoin(base, ref)!r} "
                        "is not in the loaded schemas (schemas are never fetched)"
                    ) from error
        for sub in resource.subresources():
            self._index(sub, base, path)

    def kinds(self) -> list[str]:
        return sorted(self._validators)

    def __contains__(self, schema_id: object) -> bool:
        return schema_id in self._schemas

    def is_record_kind(self, schema_id: str) -> bool:
        return schema_id in self._validators

    def schema(self, schema_id: str) -> dict:
        """A copy of the schema with this ``$id`` (KeyError if none)."""
        return copy.deepcopy(self._schemas[schema_id])

    def documents(self) -> dict[str, dict]:
        """A copy of every loaded schema, abstract ones included, by ``$id``."""
        return copy.deepcopy(self._schemas)

    def validate(self, document: Any) -> list[Violation]:
        """Every violation of ``document`` against the kind it names, sorted by pointer."""
        if not isinstance(document, dict):
            message = f"{_short_repr(document)} is not of type 'object'"
            return [Violation("", message, ENVELOPE_ID, "type")]
        if "schema" not in document:
            message = "'schema' is a required property"
            return [Violation("/schema", message, ENVELOPE_ID, "required")]
        kind = document["schema"]
        validator = self._validators.get(kind) if isinstance(kind, str) else None
        if validator is None:
            message = f"{_short_repr(kind)} is not a known record kind; known: {', '.join(self.kinds())}"
            return [Violation("/schema", message, ENVELOPE_ID, "enum")]
        fast = self._fast.get(kind)
        if fast is not None:
            try:
                if fast.is_valid(document):
                    return []
            except Exception:  # a value it cannot take (never a verdict): jsonschema decides
                pass
        pairs = [pair for error in validator.iter_errors(document) for pair in self._violations(error, kind)]
        pairs.sort(key=lambda p: (_path_key(p[0]), p[1].schema_id, p[1].keyword, p[1].message))
        return [violation for _, violation in pairs]

    def _violations(self, error: ValidationError, kind: str) -> Iterator[tuple[tuple, Violation]]:
        """One violation per error, except that a missing or a forbidden property gets the
        property's own pointer (``/body/class``), one violation per property."""
        schema_id = self._owner.get(id(error.schema), kind)
        keyword = str(error.validator)
        path = tuple(error.absolute_path)
        if keyword == "required" and isinstance(error.instance, dict):
            missing = [n for n in error.validator_value if n not in error.instance]
            # jsonschema reports one error per missing name, and says which only in the message.
            name = next((n for n in missing if error.message == f"{n!r} is a required property"), None)
            if name is not None:
                path += (name,)
        elif keyword == "dependentRequired" and isinstance(error.instance, dict):
            # "'system' is a dependency of 'code'": point at the missing property.
            needed = {n for names in error.validator_value.values() for n in names}
            name = next((n for n in needed if error.message.startswith(f"{n!r} is a dependency of ")), None)
            if name is not None:
                path += (name,)
        elif keyword == "not" and error.validator_value == {} and path:
            # {"not": {}} forbids a property where it stands, e.g. a second value[x].
            message = f"{_short_repr(path[-1])} is not allowed together with another property present"
            yield path, Violation(_pointer(path), message, schema_id, keyword)
            return
        elif keyword == "additionalProperties" and error.validator_value is False:
            for name in _extra_properties(error.schema, error.instance):
                message = f"{_short_repr(name)} was unexpected (additional properties are not allowed)"
                extra = path + (name,)
                yield extra, Violation(_pointer(extra), message, schema_id, keyword)
            return
        yield path, Violation(_pointer(path), _message(error), schema_id, keyword)


def _read_schema(path: Path) -> dict:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SchemaError(f"{path}: not a readable JSON file: {error}") from error
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: a schema must be a JSON object")
    if schema.get("$schema") != DRAFT_2020_12:
        raise SchemaError(f"{path}: $schema must be {DRAFT_2020_12!r}")
    sid = schema.get("$id")
    if not isinstance(sid, str) or not re.match(r"^[a-z][a-z0-9+.-]*://", sid) or "#" in sid:
        raise SchemaError(f"{path}: $id must be an absolute URI without fragment, got {sid!r}")
    try:
        Draft202012Validator.check_schema(schema)
    except _JsonSchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise SchemaError(f"{path}: not a valid 2020-12 schema at {where}: {error.message}") from None
    return schema


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + "...(truncated)"


def _message(error: ValidationError) -> str:
    text = repr(error.instance)
    if len(text) > _REPR_LIMIT and text in error.message:
        return error.message.replace(text, _short_repr(error.instance))
    return error.message


def _path_key(path: Iterable[str | int]) -> tuple:
    # Array indexes sort as numbers: /items/2 before /items/10.
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path)


def _extra_properties(schema: dict, instance: dict) -> list[str]:
    known = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    return [n for n in instance if n not in known and not any(re.search(p, n) for p in patterns)]


def _pointer(path: Iterable[str | int]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)
