"""CIDs as Kubo reads them, parsed by ``multiformats`` (never by hand).

Authorization decides on the CID an argument names, so the gateway must read a CID exactly as
Kubo (go-cid) does, or refuse it. ``multiformats`` validates every field at run time, which
costs about 0.4 ms a parse; the same CIDs come back again and again (a record read, its
history, its attachment), so parses of short strings are cached (and so are the gateway's own fixed-layout CIDs, both ways).

The gateway's own CIDs (what ``ipld.cid_of`` makes, and the CIDs ``add`` answers) have one fixed
layout: CIDv1, base32, a one-byte codec, sha2-256. ``sha256_cid`` writes that layout and
``sha256_cid_bytes`` reads exactly it back (a string is accepted only if writing its bytes again
gives the same string), so the append path and the canonical form of such CIDs never pay for a
``multiformats`` parse; every other string is parsed by ``multiformats`` as before.
"""

from __future__ import annotations

import base64
import functools

from multiformats import CID

MAX_CID_TEXT = 512  # far above any real CID (a sha2-512 CIDv1 in base16 is ~140 characters)

# Codecs whose code is one varint byte and that the gateway writes or indexes: raw, dag-pb, dag-cbor.
FIXED_CODECS = {0x55: "raw", 0x70: "dag-pb", 0x71: "dag-cbor"}
_SHA256_HEAD = bytes([0x12, 0x20])   # multihash sha2-256, 32 bytes
_FIXED_TEXT_LEN = 59                  # "b" + base32 of 36 bytes, unpadded
_BASE32_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz234567")


@functools.lru_cache(maxsize=8192)
def sha256_cid(codec: int, digest: bytes) -> str:
    """The CIDv1 (base32, sha2-256) of a block with this codec and SHA-256 ``digest``: the
    string ``multiformats`` and Kubo write for it."""
    raw = bytes([0x01, codec]) + _SHA256_HEAD + digest
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


@functools.lru_cache(maxsize=8192)
def sha256_cid_bytes(text: str) -> bytes | None:
    """The binary CID of ``text`` if it is exactly a ``sha256_cid`` string (one of the fixed
    codecs), else None (parse it with ``multiformats``). Cached like ``_parse``: a record read
    names its CID several times and its links name the records before it, and base32 in pure
    Python was a tenth of a history page's CPU."""
    if len(text) != _FIXED_TEXT_LEN or text[0] != "b" or not _BASE32_LOWER.issuperset(text[1:]):
        return None
    raw = base64.b32decode(text[1:].upper() + "======")
    if raw[0] != 0x01 or raw[1] not in FIXED_CODECS or raw[2:4] != _SHA256_HEAD:
        return None
    return raw if sha256_cid(raw[1], raw[4:]) == text else None


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
    """Whether ``text`` is a CID ``parse_cid`` reads, without its cost for the gateway's own
    fixed-layout CIDs (a first ``multiformats`` parse was 9 % of a replica's CPU). Bounded
    before either cached reader sees it, as in ``parse_cid``."""
    if not isinstance(text, str) or not text or len(text) > MAX_CID_TEXT:
        return False
    return sha256_cid_bytes(text) is not None or _parse(text) is not None


@functools.lru_cache(maxsize=8192)
def _canonical(text: str) -> str | None:
    if sha256_cid_bytes(text) is not None:
        return text  # already the canonical form
    cid = parse_cid(text)
    return None if cid is None else str(cid.set(base="base32", version=1))


def canonical(text: str) -> str | None:
    """The CIDv1 base32 form of a CID (how the gateway indexes what it wrote), or None."""
    if not isinstance(text, str) or not text or len(text) > MAX_CID_TEXT:
        return None
    return _canonical(text)
