"""TFRecord framing read from a byte stream, every checksum checked (no TensorFlow).

A TFRecord file is a sequence of records, each::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

(little-endian). :func:`iter_records` yields each record's data from any
binary stream -- a local file, or a ``gs://`` object streamed in chunks by
:meth:`Storage.read_records` -- so a data set is read where it lies, never
copied. A record cut off by the end of the stream or failing a checksum
raises :class:`RecordFramingError` (a ``ValueError``), naming the byte offset;
corrupt records are never skipped.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

__all__ = ["RecordFramingError", "iter_records", "masked_crc"]

_HEADER = 12  # length (8) and its checksum (4)
_FOOTER = 4  # the data's checksum
_MASK_DELTA = 0xA282EAD8


class RecordFramingError(ValueError):
    """A record is truncated or fails its checksum."""


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the stream."""
    parts: list[bytes] = []
    left = n
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def iter_records(stream: BinaryIO) -> Iterator[bytes]:
    """Each record's data, in order.

    Raises:
        RecordFramingError: a record cut off by the end of the stream, or a
            length or data checksum that does not match.
    """
    offset = 0
    while True:
        header = _read_exact(stream, _HEADER)
        if not header:
            return
        if len(header) < _HEADER:
            raise RecordFramingError(
                f"truncated record: the file ends {len(header)} bytes into the record "
                f"header at byte {offset}"
            )
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc(header[:8]) != length_crc:
            raise RecordFramingError(f"corrupted record at byte {offset}: bad length checksum")
        body = _read_exact(stream, length + _FOOTER)
        if len(body) < length + _FOOTER:
            raise RecordFramingError(
                f"truncated record: the file ends {len(body)} of {length + _FOOTER} bytes "
                f"into the record at byte {offset}"
            )
        data = body[:length]
        if masked_crc(data) != struct.unpack("<I", body[length:])[0]:
            raise RecordFramingError(f"corrupted record at byte {offset}: bad data checksum")
        yield data
        offset += _HEADER + length + _FOOTER
