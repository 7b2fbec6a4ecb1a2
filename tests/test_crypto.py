"""gateway.security.crypto: records, pseudonyms, signatures and the segmented blob format.

Every property is tested from the failing side too: tampering, truncation, reordering,
extension, wrong keys and wrong AAD must all raise DecryptError (or verify False).
"""

from __future__ import annotations

import base64
import hashlib
import hmac as std_hmac
import random
import struct
import tracemalloc
from typing import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.security import crypto
from gateway.security.crypto import DecryptError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


# --- helpers -----------------------------------------------------------------------------------

async def agen(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def split_random(data: bytes, rng: random.Random, max_chunk: int = 5000) -> list[bytes]:
    """``data`` cut at random points, with some empty chunks thrown in."""
    out, i = [], 0
    while i < len(data):
        n = rng.choice([0, 1, rng.randint(1, 17), rng.randint(1, max_chunk)])
        out.append(data[i:i + n])
        i += n
    return out


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def encrypt(data: bytes, seg: int, rng: random.Random | None = None, key: bytes = KEY, key_id: str = "dek-1") -> bytes:
    parts = split_random(data, rng) if rng else [data]
    return await collect(crypto.encrypt_stream(agen(*parts), key, key_id, seg))


async def decrypt(blob: bytes, rng: random.Random | None = None, key: bytes = KEY) -> bytes:
    parts = split_random(blob, rng) if rng else [blob]
    return await collect(crypto.decrypt_stream(agen(*parts), lambda _kid: key))


def flip(data: bytes, i: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[i] ^= mask
    return bytes(b)


def segments_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    header = crypto.parse_header(blob)
    full = header.segment_size + crypto.TAG_SIZE
    body = blob[header.length:]
    return header.raw, [body[i:i + full] for i in range(0, len(body), full)]


# --- records -----------------------------------------------------------------------------------

@pytest.mark.parametrize("plaintext", [b"", b"x", b'{"schema":"note"}' * 1000])
def test_seal_round_trip(plaintext: bytes) -> None:
    sealed = crypto.seal(plaintext, KEY, b"ctx")
    assert sealed[0] == 1
    assert len(sealed) == 1 + 12 + len(plaintext) + 16
    assert crypto.open_sealed(sealed, KEY, b"ctx") == plaintext


def test_seal_uses_fresh_nonces() -> None:
    assert crypto.seal(b"same", KEY, b"") != crypto.seal(b"same", KEY, b"")


def test_open_sealed_rejects_wrong_key_and_aad() -> None:
    sealed = crypto.seal(b"secret", KEY, b"patient:ps-a")
    with pytest.raises(DecryptError):
        crypto.open_sealed(sealed, OTHER_KEY, b"patient:ps-a")
    for aad in (b"patient:ps-b", b"", b"patient:ps-a\x00"):
        with pytest.raises(DecryptError):
            crypto.open_sealed(sealed, KEY, aad)


def test_open_sealed_names_an_unknown_version() -> None:
    sealed = crypto.seal(b"x", KEY, b"")
    with pytest.raises(DecryptError, match="version 2"):
        crypto.open_sealed(b"\x02" + sealed[1:], KEY, b"")


def test_open_sealed_rejects_every_flipped_byte_and_truncation() -> None:
    sealed = crypto.seal(b"some record", KEY, b"ctx")
    for i in range(len(sealed)):  # version, nonce, ciphertext, tag
        with pytest.raises(DecryptError):
            crypto.open_sealed(flip(sealed, i), KEY, b"ctx")
    for n in range(len(sealed)):
        with pytest.raises(DecryptError):
            crypto.open_sealed(sealed[:n], KEY, b"ctx")
    with pytest.raises(DecryptError):
        crypto.open_sealed(sealed + b"\x00", KEY, b"ctx")


def test_seal_rejects_bad_keys() -> None:
    for key in (b"", b"k" * 16, b"k" * 31, b"k" * 33):
        with pytest.raises(ValueError):
            crypto.seal(b"x", key, b"")
        with pytest.raises(ValueError):
            crypto.open_sealed(b"\x01" + b"\x00" * 40, key, b"")


# --- pseudonyms --------------------------------------------------------------------------------

def test_pseudonym_shape_and_stability() -> None:
    p = crypto.pseudonym(KEY, "patient", "P-12345")
    assert p == crypto.pseudonym(KEY, "patient", "P-12345")
    assert p.startswith("ps-")
    body = p[3:]
    assert len(body) == 52 and set(body) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert "P-12345" not in p


def test_pseudonym_matches_documented_construction() -> None:
    """An independent recomputation with the stdlib, so the construction cannot drift silently."""
    kind, value = "patient", "Jöns"
    msg = b"medicon/pseudonym/v1"
    for part in (kind.encode(), value.encode()):
        msg += struct.pack(">I", len(part)) + part
    digest = std_hmac.new(KEY, msg, hashlib.sha256).digest()
    expected = "ps-" + base64.b32encode(digest).decode().rstrip("=").lower()
    assert crypto.pseudonym(KEY, kind, value) == expected


def test_pseudonym_separates_keys_kinds_and_boundaries() -> None:
    base = crypto.pseudonym(KEY, "patient", "x")
    assert crypto.pseudonym(OTHER_KEY, "patient", "x") != base
    assert crypto.pseudonym(KEY, "clinician", "x") != base
    assert crypto.pseudonym(KEY, "patient", "y") != base
    assert crypto.pseudonym(KEY, "ab", "c") != crypto.pseudonym(KEY, "a", "bc")
    with pytest.raises(ValueError):
        crypto.pseudonym(b"short", "patient", "x")


# --- signatures --------------------------------------------------------------------------------

def test_canonical_json() -> None:
    obj = {"b": [1, 2.5, None, True], "a": {"z": "é€", "y": ""}}
    out = crypto.canonical_json(obj)
    assert out == '{"a":{"y":"","z":"é€"},"b":[1,2.5,null,true]}'.encode("utf-8")
    assert crypto.canonical_json({"a": {"y": "", "z": "é€"}, "b": [1, 2.5, None, True]}) == out
    for bad in (float("nan"), float("inf"), float("-inf"), {"x": [float("nan")]}):
        with pytest.raises(ValueError):
            crypto.canonical_json(bad)


def test_sign_and_verify() -> None:
    sk = Ed25519PrivateKey.generate()
    pk = sk.public_key()
    obj = {"record": "r1", "n": 3, "text": "naïve"}
    sig = crypto.sign(sk, obj)
    assert "=" not in sig and "+" not in sig and "/" not in sig
    assert len(base64.urlsafe_b64decode(sig + "==")) == 64
    assert crypto.verify_signature(pk, obj, sig)
    assert crypto.verify_signature(pk, dict(reversed(list(obj.items()))), sig)  # key order is irrelevant
    assert not crypto.verify_signature(pk, {**obj, "n": 4}, sig)
    assert not crypto.verify_signature(Ed25519PrivateKey.generate().public_key(), obj, sig)


def test_verify_rejects_mangled_signatures() -> None:
    sk = Ed25519PrivateKey.generate()
    obj = {"a": 1}
    sig = crypto.sign(sk, obj)
    pk = sk.public_key()
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    for bad in (flipped, sig[:-1], sig + "A", sig + "==", sig[:20] + "!" + sig[20:], sig[:20] + "\n" + sig[20:], "", "***"):
        assert not crypto.verify_signature(pk, obj, bad), bad


def test_key_serialisation_round_trip() -> None:
    sk = Ed25519PrivateKey.generate()
    raw_sk = crypto.private_key_to_bytes(sk)
    raw_pk = crypto.public_key_to_bytes(sk.public_key())
    assert len(raw_sk) == 32 and len(raw_pk) == 32
    sk2 = crypto.private_key_from_bytes(raw_sk)
    pk2 = crypto.public_key_from_bytes(raw_pk)
    assert crypto.public_key_to_bytes(sk2.public_key()) == raw_pk
    assert crypto.verify_signature(pk2, [1, "x"], crypto.sign(sk2, [1, "x"]))


# --- blobs: round trips ------------------------------------------------------------------------

SEG = crypto.DEFAULT_SEGMENT_SIZE


@pytest.mark.parametrize("seg", [SEG, 100])
@pytest.mark.parametrize("size_of", [
    lambda s: 0, lambda s: 1, lambda s: s - 1, lambda s: s, lambda s: s + 1, lambda s: 5 * s + 17, lambda s: 3 * s,
], ids=["0", "1", "seg-1", "seg", "seg+1", "5seg+17", "3seg"])
async def test_blob_round_trip(seg: int, size_of) -> None:
    rng = random.Random(seg * 1000 + size_of(seg))
    data = rng.randbytes(size_of(seg))
    blob = await encrypt(data, seg, rng)
    header = crypto.parse_header(blob)
    assert (header.segment_size, header.key_id, header.version) == (seg, "dek-1", 1)
    assert blob[:4] == b"MDCB" and header.raw == blob[:header.length]
    segments = max(1, -(-len(data) // seg))
    assert len(blob) == header.length + len(data) + 16 * segments
    assert crypto.segment_count(len(blob), header) == segments
    assert crypto.plaintext_size(len(blob), header) == len(data)
    assert await decrypt(blob, rng) == data
    assert crypto.decrypt_blob(blob, lambda _: KEY) == data
    # The whole-buffer helper writes the same format.
    assert crypto.decrypt_blob(crypto.encrypt_blob(data, KEY, "dek-1", seg), lambda _: KEY) == data


async def test_blob_segments_are_whole_and_header_is_fresh() -> None:
    seg = 64
    blob = await encrypt(bytes(5 * seg + 17), seg, random.Random(1))
    header, segments = segments_of(blob)
    assert [len(s) for s in segments] == [seg + 16] * 5 + [17 + 16]
    assert crypto.parse_header(await encrypt(b"", seg)).nonce_prefix != crypto.parse_header(blob).nonce_prefix


async def test_encrypt_stream_yields_header_then_segments() -> None:
    seg = 64
    out = [c async for c in crypto.encrypt_stream(agen(bytes(100), bytes(100)), KEY, "k", seg)]
    assert crypto.parse_header(out[0]).length == len(out[0])
    assert [len(c) for c in out[1:]] == [80, 80, 80, 8 + 16]


async def test_decrypt_stream_looks_up_key_by_id_and_propagates_its_errors() -> None:
    blob = await encrypt(b"hello", 64, key_id="dek-abc")
    asked = []

    def key_for(kid: str) -> bytes:
        asked.append(kid)
        return KEY

    assert await collect(crypto.decrypt_stream(agen(blob), key_for)) == b"hello"
    assert asked == ["dek-abc"]

    class Gone(Exception):
        pass

    def shredded(kid: str) -> bytes:
        raise Gone(kid)

    with pytest.raises(Gone):
        await collect(crypto.decrypt_stream(agen(blob), shredded))
    with pytest.raises(DecryptError):
        await decrypt(blob, key=OTHER_KEY)


def test_blob_rejects_bad_parameters() -> None:
    for seg in (0, 15, crypto.MAX_SEGMENT_SIZE + 1):
        with pytest.raises(ValueError):
            crypto.BlobEncryptor(KEY, "k", seg)
    for kid in ("", "x" * 1025):
        with pytest.raises(ValueError):
            crypto.BlobEncryptor(KEY, kid)
    with pytest.raises(ValueError):
        crypto.BlobEncryptor(b"short", "k")
    enc = crypto.BlobEncryptor(KEY, "k")
    enc.finalize()
    with pytest.raises(ValueError):
        enc.update(b"more")


async def test_64_mib_stream_keeps_memory_flat() -> None:
    block = random.Random(7).randbytes(SEG)
    n_blocks = 1024  # 64 MiB
    expected = hashlib.sha256()
    for i in range(n_blocks):
        expected.update(block[:-4] + i.to_bytes(4, "big"))

    async def source() -> AsyncIterator[bytes]:
        for i in range(n_blocks):
            # Odd chunk sizes so the encryptor really re-buffers across segment boundaries.
            chunk = block[:-4] + i.to_bytes(4, "big")
            yield chunk[:1000]
            yield chunk[1000:]

    got, total = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        ciphertext = crypto.encrypt_stream(source(), KEY, "dek-big")
        async for plain in crypto.decrypt_stream(ciphertext, lambda _: KEY):
            got.update(plain)
            total += len(plain)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == n_blocks * SEG
    assert got.digest() == expected.digest()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"


# --- blobs: attacks ----------------------------------------------------------------------------

@pytest.fixture
async def multi() -> tuple[bytes, bytes]:
    """(plaintext, blob) with six segments, the last one short."""
    data = random.Random(3).randbytes(5 * 64 + 17)
    return data, await encrypt(data, 64)


async def test_tamper_any_header_byte(multi) -> None:
    _, blob = multi
    header = crypto.parse_header(blob)
    for i in range(header.length):
        for mask in (0x01, 0x80):
            with pytest.raises(DecryptError):
                await decrypt(flip(blob, i, mask))


async def test_tamper_segment_bytes_and_tags(multi) -> None:
    _, blob = multi
    header, segments = segments_of(blob)
    offset = len(header)
    for seg in segments:
        # first ciphertext byte, a middle byte, first and last tag byte
        for i in {0, len(seg) // 2, len(seg) - 16, len(seg) - 1}:
            with pytest.raises(DecryptError):
                await decrypt(flip(blob, offset + i))
        offset += len(seg)


async def test_truncation_is_detected(multi) -> None:
    _, blob = multi
    header, segments = segments_of(blob)
    cuts = {len(blob) - len(segments[-1]), len(blob) - 1, len(header), 0, 3, len(header) - 1}
    cuts |= {len(header) + i * len(segments[0]) for i in range(1, 6)}  # every segment boundary
    for cut in cuts:
        with pytest.raises(DecryptError):
            await decrypt(blob[:cut])


async def test_truncating_a_full_final_segment_is_detected() -> None:
    blob = await encrypt(bytes(3 * 64), 64)  # last segment is full
    header, segments = segments_of(blob)
    assert len(segments) == 3
    with pytest.raises(DecryptError):
        await decrypt(header + segments[0] + segments[1])
    empty = await encrypt(b"", 64)
    with pytest.raises(DecryptError):
        await decrypt(crypto.parse_header(empty).raw)


async def test_reordering_dropping_and_splicing_are_detected(multi) -> None:
    _, blob = multi
    header, segments = segments_of(blob)
    swapped = segments[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(DecryptError):
        await decrypt(header + b"".join(swapped))
    with pytest.raises(DecryptError):  # drop a middle segment
        await decrypt(header + b"".join(segments[:2] + segments[3:]))
    with pytest.raises(DecryptError):  # duplicate one
        await decrypt(header + b"".join(segments[:3] + segments[2:]))
    other = await encrypt(random.Random(4).randbytes(5 * 64 + 17), 64)  # same key, id and size
    _, other_segments = segments_of(other)
    spliced = segments[:]
    spliced[1] = other_segments[1]
    with pytest.raises(DecryptError):
        await decrypt(header + b"".join(spliced))


@pytest.mark.parametrize("size", [0, 5 * 64 + 17, 3 * 64])
async def test_appended_data_is_detected(size: int) -> None:
    blob = await encrypt(bytes(size), 64)
    _, segments = segments_of(blob)
    for extra in (b"\x00", bytes(16), bytes(80), bytes(200), segments[-1]):
        with pytest.raises(DecryptError):
            await decrypt(blob + extra)


async def test_non_canonical_empty_final_segment_is_rejected() -> None:
    """Even the key holder cannot end a non-empty blob with an empty segment: sizes must stay
    computable from the ciphertext length alone (plaintext_size, ranges)."""
    header = crypto.BlobHeader.create("k", 64)
    aead = crypto._aead(KEY)
    odd = header.raw + crypto._seal_segment(aead, header, 0, False, bytes(64)) + crypto._seal_segment(aead, header, 1, True, b"")
    with pytest.raises(DecryptError):
        await decrypt(odd)
    with pytest.raises(DecryptError):
        crypto.plaintext_size(len(odd), header)


async def test_consumer_sees_error_at_the_end(multi) -> None:
    """Plaintext of early segments may arrive before a later failure: the stream still raises."""
    _, blob = multi
    got = []
    with pytest.raises(DecryptError):
        async for chunk in crypto.decrypt_stream(agen(blob[:-1]), lambda _: KEY):
            got.append(chunk)
    assert got  # partial output existed, and the consumer was told it is not authentic


def test_parse_header_rejects_garbage() -> None:
    good = crypto.BlobHeader.create("dek-1", 64).raw
    assert crypto.parse_header(good + b"tail").raw == good
    for bad in (b"", good[:10], good[:-1], b"XXXX" + good[4:], good[:4] + b"\x02" + good[5:],
                good[:5] + struct.pack(">I", 1) + good[9:], good[:16] + b"\x00\x00" + good[18:],
                good[:16] + struct.pack(">H", 5) + b"\xff\xfe\xfd\xfc\xfb"):
        with pytest.raises(DecryptError):
            crypto.parse_header(bad)


# --- blobs: ranges -----------------------------------------------------------------------------

class Counting:
    """An async source that records how many bytes were pulled from it."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.consumed = data, chunk, 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.chunk):
            piece = self.data[i:i + self.chunk]
            self.consumed += len(piece)
            yield piece


async def read_range(blob: bytes, start: int, end: int, rng: random.Random | None = None, key: bytes = KEY) -> bytes:
    header = crypto.parse_header(blob[:crypto.HEADER_MAX_SIZE])
    offset, length, skip = crypto.ciphertext_range(header, start, end, len(blob))
    parts = split_random(blob[offset:offset + length], rng, 300) if rng else [blob[offset:offset + length]]
    return await collect(crypto.decrypt_range(
        agen(*parts), header, key, start // header.segment_size,
        crypto.segment_count(len(blob), header), skip, end - start + 1,
    ))


@pytest.mark.parametrize("size", [1, 63, 64, 65, 10 * 64 + 23, 10 * 64])
async def test_ranges_match_plaintext(size: int) -> None:
    seg = 64
    rng = random.Random(size)
    data = rng.randbytes(size)
    blob = await encrypt(data, seg, rng)
    last = size - 1
    fixed = [(0, 0), (0, last), (last, last), (max(0, last - 70), last),
             (0, min(last, seg - 1)), (min(last, seg - 1), min(last, seg)), (min(last, 5), min(last, 9))]
    randoms = [tuple(sorted((rng.randint(0, last), rng.randint(0, last)))) for _ in range(150)]
    for start, end in fixed + randoms:
        assert await read_range(blob, start, end, rng) == data[start:end + 1], (start, end)


async def test_range_decrypts_only_the_needed_segments(monkeypatch) -> None:
    seg = 64
    data = random.Random(9).randbytes(10 * seg + 23)
    blob = await encrypt(data, seg)
    header = crypto.parse_header(blob)
    total = crypto.segment_count(len(blob), header)
    opened: list[tuple[int, bool]] = []
    real_open = crypto._open_segment

    def counting_open(aead, hdr, index, final, ciphertext):
        opened.append((index, final))
        return real_open(aead, hdr, index, final, ciphertext)

    monkeypatch.setattr(crypto, "_open_segment", counting_open)
    for start, end in [(70, 80), (60, 200), (0, 0), (len(data) - 1, len(data) - 1), (130, len(data) - 1)]:
        opened.clear()
        offset, length, skip = crypto.ciphertext_range(header, start, end, len(blob))
        first, last = start // seg, end // seg
        assert offset == header.length + first * (seg + 16)
        assert length == min((last - first + 1) * (seg + 16), len(blob) - offset)
        assert skip == start % seg
        # Offer the whole rest of the blob, one byte at a time: only the range may be pulled.
        source = Counting(blob[offset:], 1)
        out = await collect(crypto.decrypt_range(source, header, KEY, first, total, skip, end - start + 1))
        assert out == data[start:end + 1]
        assert source.consumed == length
        assert opened == [(i, i == total - 1) for i in range(first, last + 1)]


async def test_range_failures() -> None:
    seg = 64
    data = random.Random(5).randbytes(4 * seg)  # the final segment is full
    blob = await encrypt(data, seg)
    header = crypto.parse_header(blob)
    full = seg + 16

    with pytest.raises(DecryptError):  # wrong key
        await read_range(blob, 10, 20, key=OTHER_KEY)
    with pytest.raises(DecryptError):  # tampered segment inside the range
        await read_range(flip(blob, header.length + full + 5), 70, 80)
    with pytest.raises(DecryptError):  # tampered header: every segment authenticates it
        await read_range(flip(blob, 10), 70, 80)
    # The stored blob lost its final segment: the new "last" one must not pass as final.
    truncated = blob[:-full]
    assert crypto.plaintext_size(len(truncated), header) == 3 * seg  # the layout alone looks fine
    with pytest.raises(DecryptError):
        await read_range(truncated, 3 * seg - 1, 3 * seg - 1)
    # The range ends early.
    offset, length, skip = crypto.ciphertext_range(header, 10, 150, len(blob))
    with pytest.raises(DecryptError):
        await collect(crypto.decrypt_range(agen(blob[offset:offset + length - 1]), header, KEY, 0, 4, skip, 141))
    # Data after the final segment.
    offset, length, skip = crypto.ciphertext_range(header, 4 * seg - 1, 4 * seg - 1, len(blob))
    for chunk in (1, 7, 1000):
        with pytest.raises(DecryptError, match="after the final"):
            await collect(crypto.decrypt_range(Counting(blob[offset:] + b"x", chunk), header, KEY, 3, 4, skip, 1))
    # Ranges outside the plaintext are the caller's error.
    for start, end in [(-1, 3), (5, 4), (0, 4 * seg), (4 * seg, 4 * seg)]:
        with pytest.raises(ValueError):
            crypto.ciphertext_range(header, start, end, len(blob))
    with pytest.raises(ValueError):
        await collect(crypto.decrypt_range(agen(blob), header, KEY, 3, 4, 0, seg + 1))


def test_sizes_of_malformed_blobs() -> None:
    header = crypto.BlobHeader.create("k", 64)
    h = header.length
    assert crypto.plaintext_size(h + 16, header) == 0
    assert crypto.plaintext_size(h + 80 + 17, header) == 65
    for bad in (0, h, h + 15, h + 80 + 16, h + 80 + 5):
        with pytest.raises(DecryptError):
            crypto.plaintext_size(bad, header)
    empty = crypto.encrypt_blob(b"", KEY, "k", 64)
    with pytest.raises(ValueError):  # an empty blob has no byte to range over
        crypto.ciphertext_range(crypto.parse_header(empty), 0, 0, len(empty))
