"""Built-in FHIR index: each committed record's embedded FHIR resources are indexed for the
FHIR R4 facade (``/fhir/r4``): where each version is (record CID, JSON pointer) and what search
finds it by, as keyed pseudonyms and date ranges (``gateway.core.fhir_search``), in the
gateway's storage (``service.storage.fhir``). Without this plugin the facade finds nothing.
"""

from __future__ import annotations

from gateway.core.fhir_facade import FhirFacade
from gateway.hookspecs import hookimpl


@hookimpl
async def medicon_record_committed(record, cid, service):
    await FhirFacade(service).add_to_index(record, cid)
