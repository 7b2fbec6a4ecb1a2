"""The FHIR index's search as SQL, written once for both backends (only the placeholders
differ: ``?`` for SQLite, ``$n`` for PostgreSQL).

Tables (``fhir_resources``: one row per version of a resource; ``fhir_params``: what search
finds a version by) are created by ``sqlite.FHIR_SCHEMA`` and the PostgreSQL migration
``0004_fhir_index.sql``. Every identifier in them is a keyed pseudonym; dates are the only
values in clear.
"""

from __future__ import annotations

from typing import Any, Callable

from .model import FhirEntry, FhirQuery

RESOURCE_COLS = "entry, type, rid, patient, episode, cid, pointer, recorded_at, version"

# A date condition on a parameter's range [low, high) against the searched range [{low}, {high}).
# ge and le are the common reading: the resource's range reaches the searched value's start
# (ge), or starts before the searched value's end (le).
DATE_CONDITIONS = {
    "eq": "p.low >= {low} AND p.high <= {high}",
    "ne": "NOT (p.low >= {low} AND p.high <= {high})",
    "gt": "p.high > {high}",
    "lt": "p.low < {low}",
    "ge": "p.high > {low}",
    "le": "p.low < {high}",
    "sa": "p.low >= {high}",
    "eb": "p.high <= {low}",
}


def entry_of(row: Any) -> FhirEntry:
    entry, type_, rid, patient, episode, cid, pointer, recorded_at, version = row
    return FhirEntry(type_, rid, patient, episode, cid, pointer, recorded_at, (), version, entry)


def search_sql(query: FhirQuery, placeholder: Callable[[int], str]) -> tuple[str, list[Any]]:
    """(SELECT statement, its arguments) finding ``query``'s rows in write order."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return placeholder(len(args))

    def among(column: str, values: tuple[str, ...]) -> str:
        return f"{column} IN ({', '.join(arg(v) for v in values)})" if values else "1 = 0"

    where = ["r.latest = 1", f"r.entry > {arg(query.after)}"]
    if query.types is not None:
        where.append(among("r.type", query.types))
    if query.patient is not None:
        where.append(among("r.patient", query.patient))
    if query.patients is not None:
        where.append(among("r.patient", query.patients))
    if query.episodes is not None:
        where.append(among("r.episode", query.episodes))
    if query.rids is not None:
        where.append(among("r.rid", query.rids))
    for alternatives in query.all_of:
        found = []
        for match in alternatives:
            name = arg(match.name)
            if match.prefix is None:
                found.append(f"(p.name = {name} AND {among('p.token', match.tokens)})")
            else:
                template = DATE_CONDITIONS[match.prefix]
                condition = template.format(low=arg(match.low) if "{low}" in template else "",
                                            high=arg(match.high) if "{high}" in template else "")
                found.append(f"(p.name = {name} AND p.low IS NOT NULL AND {condition})")
        where.append(f"EXISTS (SELECT 1 FROM fhir_params p WHERE p.entry = r.entry AND ({' OR '.join(found)}))")
    sql = (f"SELECT {', '.join('r.' + c for c in RESOURCE_COLS.split(', '))} FROM fhir_resources r"
           f" WHERE {' AND '.join(where)} ORDER BY r.entry LIMIT {arg(query.limit)}")
    return sql, args
