"""CIDs as Kubo reads them, parsed by ``multiformats`` (never by hand).

Authorization decides on the CID an argument names, so the gateway must read a CID exactly as
Kubo (go-cid) does, or refuse it. ``multiformats`` validates every field at run time, which
costs about 0.4 ms a parse; the same CIDs come back again and again (a record read, its
history, its attachment), so parses of short strings are cached.
"""

from __future__ import annotations

import functools

from multiformats import CID

MAX_CID_TEXT = 512  # far above any real CID (a sha2-512 CIDv1 in base16 is ~140 characters)


@functools.lru_cache(maxsize=8192)
def _parse(text: str) -> CID | None:
    try:
        return CID.decode(text)
    except Exception:  # multiformats raises several error types for malformed text
        return None


def parse_cid(text: str) -> CID | None:
    """The CID ``text`` names, or None if it is not one (multibase CIDv1, or a CIDv0 ``Qm…``).
    A multibase-encoded CIDv0 (``zQm…``), which go-cid also reads, is refused: fail closed."""
    if not isinstance(text, str) or not text or len(text) > MAX_CID_TEXT:
        return None
    return _parse(text)


def is_cid(text: str) -> bool:
    return parse_cid(text) is not None


def canonical(text: str) -> str | None:
    """The CIDv1 base32 form of a CID (how the gateway indexes what it wrote), or None."""
    cid = parse_cid(text)
    return None if cid is None else str(cid.set(base="base32", version=1))
