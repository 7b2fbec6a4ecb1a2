"""Blocks read from a CARv1 stream as it arrives (Kubo's ``dag/export`` answer).

A CARv1 is a varint-length-prefixed dag-cbor header, then varint-length-prefixed sections,
each a binary CID followed by its block. The reader yields ``(cid_bytes, block)`` one section
at a time and never holds more than one section, so a caller can stop after the blocks it
wanted and close the stream. Nothing here trusts the stream: a section longer than
``max_section`` or cut short is ``CarError``, and the CID a section names is the stream's claim,
which the caller checks against the block's hash (``ipld.decode``) before using it.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

MAX_SECTION = 2 * 1024 * 1024 + 512  # Kubo stores no block over 2 MiB; room for the CID
_MAX_VARINT = 9  # bytes: enough for any 63-bit length


class CarError(ValueError):
    """The stream is not a CARv1 this reader accepts."""


class ByteStream(Protocol):
    """What the reader needs of ``aiohttp.StreamReader``: the bytes that have arrived, or
    ``b""`` at the end."""

    async def readany(self) -> bytes: ...


def _uvarint(data: bytes | bytearray, offset: int) -> tuple[int, int] | None:
    """The unsigned varint at ``offset`` and the offset after it; None if ``data`` ends first.
    (Written out: ``multiformats.varint`` type-checks every call at run time, which took a
    third of a history page's CAR reading.)"""
    value = shift = 0
    for index in range(offset, min(len(data), offset + _MAX_VARINT)):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    if len(data) - offset >= _MAX_VARINT:
        raise CarError("a length longer than any block")
    return None


def _cid_length(section: bytes) -> int:
    """How many bytes of ``section`` its binary CIDv1 takes (version, codec, multihash)."""
    if section[:1] != b"\x01":
        raise CarError("a section that does not start with a CIDv1")
    offset = 0
    for _ in range(4):  # version, codec, hash function, digest length
        parsed = _uvarint(section, offset)
        if parsed is None:
            raise CarError("a section cut inside its CID")
        digest_length, offset = parsed
    if offset + digest_length > len(section):
        raise CarError("a section cut inside its CID")
    return offset + digest_length


class _Buffered:
    """The stream's bytes as they arrive, read by varint and by length."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream, self.data, self.offset = stream, bytearray(), 0

    async def _more(self) -> bool:
        chunk = await self.stream.readany()
        if not chunk:
            return False
        del self.data[:self.offset]  # what was read (a bytearray drops its front in place)
        self.data += chunk
        self.offset = 0
        return True

    async def length(self) -> int | None:
        """The next varint, or None at a clean end of the stream."""
        while (parsed := _uvarint(self.data, self.offset)) is None:
            if not await self._more():
                if self.offset == len(self.data):
                    return None
                raise CarError("the stream ends inside a length")
        value, self.offset = parsed
        return value

    async def exactly(self, size: int) -> bytes:
        while len(self.data) - self.offset < size:
            if not await self._more():
                raise CarError("the stream ends inside a section")
        part = bytes(self.data[self.offset:self.offset + size])
        self.offset += size
        return part


async def blocks(stream: ByteStream, max_section: int = MAX_SECTION) -> AsyncIterator[tuple[bytes, bytes]]:
    """``(cid_bytes, block)`` for each section of the CARv1 ``stream``, in stream order."""
    reader = _Buffered(stream)
    header = await reader.length()
    if header is None or not 0 < header <= max_section:
        raise CarError("no CAR header")
    await reader.exactly(header)
    while (length := await reader.length()) is not None:
        if not 0 < length <= max_section:
            raise CarError(f"a section of {length} bytes")
        section = await reader.exactly(length)
        split = _cid_length(section)
        yield section[:split], section[split:]
