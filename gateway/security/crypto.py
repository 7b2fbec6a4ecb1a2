"""Cryptographic building blocks for encryption before IPFS.

Whatever reaches Kubo is readable by anyone who learns its CID, so the gateway encrypts records
and attachments first and names patients only by keyed pseudonyms. This module holds the pure
primitives — no I/O, no key storage (that is ``keyring``) — built only from the ``cryptography``
library's AES-GCM, HMAC-SHA256 and Ed25519:

* records: ``seal`` / ``open_sealed`` — one AES-256-GCM message bound to caller-chosen AAD;
* pseudonyms: ``pseudonym`` — stable, keyed, domain-separated identifiers;
* signatures: ``canonical_json``, ``sign``, ``verify_signature`` and raw key (de)serialisation;
* blobs: a segmented streaming AEAD (in the spirit of age / Tink's streaming AEAD, the STREAM
  construction) for attachments of any size, with flat memory and random-access ranges.

Blob format (all integers big-endian)::

    header  = b"MDCB" | version u8 (=1) | segment_size u32 | nonce_prefix (7 bytes)
              | key_id_len u16 | key_id (UTF-8)
    segment = AES-256-GCM(key, nonce = nonce_prefix | index u32 | final u8, aad = header)
              -> ciphertext | 16-byte tag

Every segment holds exactly ``segment_size`` plaintext bytes except the last, which holds
1..segment_size (0 only when the whole plaintext is empty: one empty final segment). The index
in the nonce stops reordering, the final flag stops truncation and extension, the header as AAD
stops header tampering — so segments can be decrypted independently (ranges) yet never spliced.
The 56-bit random nonce prefix is chosen per blob: keep well under 2**28 blobs per key (per-patient
data keys make that comfortable).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterable, AsyncIterator, Callable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32       # AES-256
NONCE_SIZE = 12     # GCM's native 96-bit nonce
TAG_SIZE = 16

__all__ = [
    "DecryptError", "new_key", "seal", "open_sealed", "pseudonym",
    "canonical_json", "sign", "verify_signature",
    "private_key_to_bytes", "private_key_from_bytes", "public_key_to_bytes", "public_key_from_bytes",
    "BlobHeader", "BlobEncryptor", "BlobDecryptor", "encrypt_stream", "decrypt_stream",
    "encrypt_blob", "decrypt_blob", "parse_header", "segment_count", "plaintext_size",
    "ciphertext_range", "decrypt_range",
    "BLOB_MAGIC", "DEFAULT_SEGMENT_SIZE", "HEADER_MAX_SIZE",
]


class DecryptError(Exception):
    """Ciphertext did not authenticate or is malformed: wrong key, wrong AAD, tampered,
    truncated, extended, reordered. Callers must treat every cause alike (never return any
    of the plaintext already produced by a stream that later raised this)."""


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return AESGCM.generate_key(bit_length=256)


def _aead(key: bytes) -> AESGCM:
    # A bad key is the caller's bug, not a property of the data: ValueError, not DecryptError.
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise ValueError(f"an AES-256 key is {KEY_SIZE} bytes")
    return AESGCM(bytes(key))


# --- records -----------------------------------------------------------------------------------

RECORD_VERSION = 1


def seal(plaintext: bytes, key: bytes, aad: bytes) -> bytes:
    """Encrypt one record: ``version u8 | nonce (12) | ciphertext | tag (16)``.

    ``aad`` should name what the record *is* (e.g. patient pseudonym, schema) so a valid
    ciphertext cannot be replayed in another context. The version byte is authenticated too.
    """
    nonce = os.urandom(NONCE_SIZE)
    version = bytes([RECORD_VERSION])
    return version + nonce + _aead(key).encrypt(nonce, plaintext, version + aad)


def open_sealed(blob: bytes, key: bytes, aad: bytes) -> bytes:
    """Decrypt what ``seal`` produced with the same key and AAD, else raise DecryptError."""
    aead = _aead(key)
    if len(blob) < 1 + NONCE_SIZE + TAG_SIZE:
        raise DecryptError("sealed record is too short")
    if blob[0] != RECORD_VERSION:
        raise DecryptError(f"unsupported sealed record version {blob[0]}")
    try:
        return aead.decrypt(blob[1:1 + NONCE_SIZE], blob[1 + NONCE_SIZE:], blob[:1] + aad)
    except InvalidTag:
        raise DecryptError("sealed record failed authentication") from None


# --- pseudonyms --------------------------------------------------------------------------------

PSEUDONYM_PREFIX = "ps-"
_PSEUDONYM_DOMAIN = b"medicon/pseudonym/v1"


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """``ps-`` + base32(HMAC-SHA256(key, domain | len|kind | len|value)), lowercase, unpadded.

    Keyed, so nobody without the key can confirm a guess (patient ids are guessable); the
    length-prefixed ``kind`` separates namespaces, so a patient "x" and a clinician "x" differ.
    """
    if len(key) < 16:
        raise ValueError("a pseudonym key must be at least 16 bytes")
    # A request asks for the same few pseudonyms many times; short values only, so hostile
    # input cannot fill the cache with large strings.
    return _pseudonym(key, kind, value) if len(value) <= 256 else _pseudonym.__wrapped__(key, kind, value)


@functools.lru_cache(maxsize=16384)
def _pseudonym(key: bytes, kind: str, value: str) -> str:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(_PSEUDONYM_DOMAIN)
    for part in (kind.encode("utf-8"), value.encode("utf-8")):
        mac.update(struct.pack(">I", len(part)) + part)
    digest = base64.b32encode(mac.finalize()).decode("ascii").rstrip("=").lower()
    return PSEUDONYM_PREFIX + digest


# --- signatures --------------------------------------------------------------------------------

def canonical_json(obj: Any) -> bytes:
    """The one byte string a JSON value signs as: sorted keys, no whitespace, UTF-8 (not
    ``\\u`` escapes). NaN and ±inf have no JSON form and raise ValueError."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64url_decode(text: str) -> bytes:
    """Strict: the decoder alone skips stray characters, which would make signatures malleable."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url(data) != text:
        raise ValueError("not canonical unpadded base64url")
    return data


def sign(private_key: Ed25519PrivateKey, obj: Any) -> str:
    """Ed25519 signature over ``canonical_json(obj)``, as unpadded base64url."""
    return _b64url(private_key.sign(canonical_json(obj)))


def verify_signature(public_key: Ed25519PublicKey, obj: Any, sig: str) -> bool:
    """True only if ``sig`` is ``sign``'s output for ``obj`` under the matching private key."""
    try:
        raw = _b64url_decode(sig)
    except (ValueError, TypeError):
        return False
    try:
        public_key.verify(raw, canonical_json(obj))
    except InvalidSignature:
        return False
    return True


def private_key_to_bytes(key: Ed25519PrivateKey) -> bytes:
    """The 32-byte raw seed (what the keyring stores)."""
    return key.private_bytes_raw()


def private_key_from_bytes(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_to_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32-byte raw public key (what verifiers publish)."""
    return key.public_bytes_raw()


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


# --- blobs: header -----------------------------------------------------------------------------

BLOB_MAGIC = b"MDCB"
BLOB_VERSION = 1
DEFAULT_SEGMENT_SIZE = 64 * 1024
MIN_SEGMENT_SIZE = 16
MAX_SEGMENT_SIZE = 16 * 1024 * 1024  # bounds what a hostile header can make a reader buffer
MAX_KEY_ID_BYTES = 1024
MAX_SEGMENTS = 2**32                 # the nonce's counter is 32 bits
_PREFIX_SIZE = 7
_FIXED = struct.Struct(">4sBI7sH")   # magic, version, segment size, nonce prefix, key id length
HEADER_MAX_SIZE = _FIXED.size + MAX_KEY_ID_BYTES  # fetch this much to be sure to parse a header


@dataclass(frozen=True)
class BlobHeader:
    """A parsed blob header; ``raw`` is its exact bytes, which every segment authenticates."""

    version: int
    segment_size: int
    nonce_prefix: bytes
    key_id: str
    raw: bytes

    @property
    def length(self) -> int:
        return len(self.raw)

    @classmethod
    def create(cls, key_id: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> BlobHeader:
        """A new header with a fresh random nonce prefix."""
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"segment size must be within {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}")
        kid = key_id.encode("utf-8")
        if not 0 < len(kid) <= MAX_KEY_ID_BYTES:
            raise ValueError(f"key id must be 1..{MAX_KEY_ID_BYTES} UTF-8 bytes")
        prefix = os.urandom(_PREFIX_SIZE)
        raw = _FIXED.pack(BLOB_MAGIC, BLOB_VERSION, segment_size, prefix, len(kid)) + kid
        return cls(BLOB_VERSION, segment_size, prefix, key_id, raw)


def _parse_fixed(data: bytes | bytearray) -> tuple[int, int, bytes, int]:
    magic, version, segment_size, prefix, kid_len = _FIXED.unpack_from(data)
    if magic != BLOB_MAGIC:
        raise DecryptError("not an encrypted blob (bad magic)")
    if version != BLOB_VERSION:
        raise DecryptError(f"unsupported blob version {version}")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise DecryptError(f"blob segment size {segment_size} out of bounds")
    if not 0 < kid_len <= MAX_KEY_ID_BYTES:
        raise DecryptError(f"blob key id length {kid_len} out of bounds")
    return version, segment_size, prefix, kid_len


def parse_header(first_bytes: bytes) -> BlobHeader:
    """Parse the header at the start of ``first_bytes`` (``HEADER_MAX_SIZE`` bytes always suffice).

    Not authenticated by itself: tampering shows when the first segment is opened.
    """
    if len(first_bytes) < _FIXED.size:
        raise DecryptError("truncated blob header")
    version, segment_size, prefix, kid_len = _parse_fixed(first_bytes)
    end = _FIXED.size + kid_len
    if len(first_bytes) < end:
        raise DecryptError("truncated blob header")
    try:
        key_id = bytes(first_bytes[_FIXED.size:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptError("blob key id is not UTF-8") from None
    return BlobHeader(version, segment_size, prefix, key_id, bytes(first_bytes[:end]))


# --- blobs: segments ---------------------------------------------------------------------------

def _seal_segment(aead: AESGCM, header: BlobHeader, index: int, final: bool, plaintext: bytes) -> bytes:
    """Encrypt one segment. Plain sync code, so callers may run it inline or in a thread."""
    if index >= MAX_SEGMENTS:
        raise ValueError("blob exceeds 2**32 segments")
    nonce = header.nonce_prefix + struct.pack(">IB", index, final)
    return aead.encrypt(nonce, plaintext, header.raw)


def _open_segment(aead: AESGCM, header: BlobHeader, index: int, final: bool, ciphertext: bytes) -> bytes:
    """Decrypt one segment at its position; any mismatch (data, place, finality) → DecryptError."""
    if index >= MAX_SEGMENTS:
        raise DecryptError("blob exceeds 2**32 segments")
    nonce = header.nonce_prefix + struct.pack(">IB", index, final)
    try:
        return aead.decrypt(nonce, ciphertext, header.raw)
    except InvalidTag:
        raise DecryptError(
            f"blob segment {index} failed authentication (tampered, reordered, truncated or wrong key)"
        ) from None


class BlobEncryptor:
    """Incremental blob encryption: write ``header.raw``, then what ``update`` returns, then
    ``finalize()``. Buffers less than one segment; sync, so it can run under ``asyncio.to_thread``."""

    def __init__(self, key: bytes, key_id: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        self._aead = _aead(key)
        self.header = BlobHeader.create(key_id, segment_size)
        self._buf = bytearray()
        self._index = 0
        self._finished = False

    def update(self, data: bytes) -> list[bytes]:
        """Feed plaintext; returns the segments it completed (possibly none)."""
        if self._finished:
            raise ValueError("BlobEncryptor already finalized")
        self._buf += data
        size, out = self.header.segment_size, []
        # Strictly more than one segment: a full segment may turn out to be the final one.
        while len(self._buf) > size:
            out.append(self._seal(bytes(self._buf[:size]), final=False))
            del self._buf[:size]  # deleting from the front of a bytearray is O(1) in CPython
        return out

    def finalize(self) -> bytes:
        """The final segment (empty plaintext only if the whole blob is empty)."""
        if self._finished:
            raise ValueError("BlobEncryptor already finalized")
        self._finished = True
        segment = self._seal(bytes(self._buf), final=True)
        self._buf.clear()
        return segment

    def _seal(self, plaintext: bytes, final: bool) -> bytes:
        segment = _seal_segment(self._aead, self.header, self._index, final, plaintext)
        self._index += 1
        return segment


class BlobDecryptor:
    """Incremental blob decryption: ``update`` with ciphertext as it arrives, then ``finalize``.

    The key is looked up through ``key_for(header.key_id)`` once the header is complete; its
    exceptions (KeyError, keyring.KeyShredded, ...) propagate unchanged so callers can map them.
    """

    def __init__(self, key_for: Callable[[str], bytes]) -> None:
        self._key_for = key_for
        self.header: BlobHeader | None = None
        self._aead: AESGCM | None = None
        self._buf = bytearray()
        self._index = 0
        self._finished = False

    def update(self, data: bytes) -> list[bytes]:
        """Feed ciphertext; returns the plaintext of every segment now known to be non-final."""
        if self._finished:
            raise ValueError("BlobDecryptor already finalized")
        self._buf += data
        if self.header is None and not self._read_header():
            return []
        assert self.header is not None and self._aead is not None
        full, out = self.header.segment_size + TAG_SIZE, []
        # Only with bytes beyond it is a segment known not to be the last.
        while len(self._buf) > full:
            out.append(_open_segment(self._aead, self.header, self._index, False, bytes(self._buf[:full])))
            del self._buf[:full]
            self._index += 1
        return out

    def finalize(self) -> bytes:
        """Open the final segment; raises DecryptError if the stream was cut or extended."""
        if self._finished:
            raise ValueError("BlobDecryptor already finalized")
        self._finished = True
        if self.header is None or self._aead is None:
            raise DecryptError("truncated blob header")
        rest = bytes(self._buf)
        self._buf.clear()
        if len(rest) < TAG_SIZE or (self._index > 0 and len(rest) == TAG_SIZE):
            raise DecryptError("truncated blob (no final segment)")
        return _open_segment(self._aead, self.header, self._index, True, rest)

    def _read_header(self) -> bool:
        if len(self._buf) < _FIXED.size:
            return False
        end = _FIXED.size + _parse_fixed(self._buf)[3]  # fail fast on garbage
        if len(self._buf) < end:
            return False
        header = parse_header(bytes(self._buf[:end]))
        self._aead = _aead(self._key_for(header.key_id))
        self.header = header
        del self._buf[:end]
        return True


async def encrypt_stream(
    chunks: AsyncIterable[bytes], key: bytes, key_id: str, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> AsyncIterator[bytes]:
    """Yield the header, then each ciphertext segment, holding at most ~one segment of plaintext
    (plus the chunk being consumed). Segment crypto runs inline: 64 KiB of AES-GCM is microseconds."""
    enc = BlobEncryptor(key, key_id, segment_size)
    yield enc.header.raw
    async for chunk in chunks:
        for segment in enc.update(chunk):
            yield segment
    yield enc.finalize()


async def decrypt_stream(chunks: AsyncIterable[bytes], key_for: Callable[[str], bytes]) -> AsyncIterator[bytes]:
    """Yield plaintext segment by segment. Authenticity of the *whole* blob is known only when
    the generator ends without DecryptError — a consumer must discard what it got if it raises."""
    dec = BlobDecryptor(key_for)
    async for chunk in chunks:
        for plaintext in dec.update(chunk):
            yield plaintext
    last = dec.finalize()
    if last:
        yield last


def encrypt_blob(plaintext: bytes, key: bytes, key_id: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> bytes:
    """Whole-buffer convenience for small attachments (same format as ``encrypt_stream``)."""
    enc = BlobEncryptor(key, key_id, segment_size)
    return b"".join([enc.header.raw, *enc.update(plaintext), enc.finalize()])


def decrypt_blob(blob: bytes, key_for: Callable[[str], bytes]) -> bytes:
    """Whole-buffer counterpart of ``decrypt_stream``."""
    dec = BlobDecryptor(key_for)
    return b"".join([*dec.update(blob), dec.finalize()])


# --- blobs: sizes and ranges -------------------------------------------------------------------

def _layout(ciphertext_size: int, header: BlobHeader) -> tuple[int, int]:
    """(segment count, plaintext size) of a blob of ``ciphertext_size`` bytes; DecryptError if
    no blob written by BlobEncryptor can have that size."""
    body = ciphertext_size - header.length
    full = header.segment_size + TAG_SIZE
    if body < TAG_SIZE:
        raise DecryptError("blob is shorter than one segment")
    count = -(-body // full)
    last = body - (count - 1) * full
    if last < TAG_SIZE or (count > 1 and last == TAG_SIZE) or count > MAX_SEGMENTS:
        raise DecryptError("blob size does not match its segment layout")
    return count, body - count * TAG_SIZE


def segment_count(ciphertext_size: int, header: BlobHeader) -> int:
    """How many segments a blob of ``ciphertext_size`` bytes (header included) has."""
    return _layout(ciphertext_size, header)[0]


def plaintext_size(ciphertext_size: int, header: BlobHeader) -> int:
    """The plaintext length of a blob of ``ciphertext_size`` bytes (header included), e.g. for
    Content-Length and for resolving HTTP ranges, without decrypting anything."""
    return _layout(ciphertext_size, header)[1]


def ciphertext_range(
    header: BlobHeader, start: int, end_inclusive: int, total_ciphertext_size: int
) -> tuple[int, int, int]:
    """(cipher_offset, cipher_length, skip) for plaintext bytes ``start..end_inclusive``.

    Fetch ``cipher_length`` bytes at ``cipher_offset`` and pass them to ``decrypt_range`` with
    ``first_segment_index = start // header.segment_size``, ``total_segments =
    segment_count(total_ciphertext_size, header)``, ``skip`` and ``length = end - start + 1``.
    The range must lie inside the plaintext (clamp HTTP ranges first): ValueError otherwise.
    """
    _, size = _layout(total_ciphertext_size, header)
    if not 0 <= start <= end_inclusive < size:
        raise ValueError(f"range {start}-{end_inclusive} is outside the plaintext (size {size})")
    seg, full = header.segment_size, header.segment_size + TAG_SIZE
    first, last = start // seg, end_inclusive // seg
    offset = header.length + first * full
    stop = min(header.length + (last + 1) * full, total_ciphertext_size)
    return offset, stop - offset, start - first * seg


async def decrypt_range(
    chunks_of_that_range: AsyncIterable[bytes],
    header: BlobHeader,
    key: bytes,
    first_segment_index: int,
    total_segments: int,
    skip: int,
    length: int,
) -> AsyncIterator[bytes]:
    """Decrypt only the segments covering a range and yield exactly ``length`` plaintext bytes,
    starting ``skip`` bytes into segment ``first_segment_index``.

    Reads no further than the last needed segment; the blob's last segment (index
    ``total_segments - 1``) is opened with the final flag, so a blob truncated to fewer
    segments fails here too. The bytes yielded are authentic even if the rest of the blob is not.
    """
    seg, full = header.segment_size, header.segment_size + TAG_SIZE
    if not 0 <= first_segment_index < total_segments or not 0 <= skip < seg or length < 0:
        raise ValueError("invalid range parameters")
    aead = _aead(key)
    if length == 0:
        return
    last_index = first_segment_index + (skip + length - 1) // seg
    if last_index >= total_segments:
        raise ValueError("range extends past the end of the blob")

    source = aiter(chunks_of_that_range)
    buf, exhausted = bytearray(), False

    async def fill(want: int) -> None:
        nonlocal exhausted
        while not exhausted and len(buf) < want:
            try:
                buf.extend(await anext(source))
            except StopAsyncIteration:
                exhausted = True

    remaining = length
    for index in range(first_segment_index, last_index + 1):
        final = index == total_segments - 1
        if final:  # its size is unknown here: it runs to the end of the stream
            await fill(full + 1)
            if len(buf) > full:
                raise DecryptError("data after the final blob segment")
            ciphertext = bytes(buf)
            buf.clear()
        else:
            await fill(full)
            if len(buf) < full:
                raise DecryptError("truncated blob range")
            ciphertext = bytes(buf[:full])
            del buf[:full]
        plaintext = _open_segment(aead, header, index, final, ciphertext)
        piece = plaintext[skip:skip + remaining]
        skip = 0
        remaining -= len(piece)
        if piece:
            yield piece
    if remaining:
        raise ValueError("range extends past the end of the blob")
