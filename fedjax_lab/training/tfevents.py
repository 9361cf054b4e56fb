"""TensorBoard event files by hand: TFRecord framing and the few protos needed.

A TensorBoard event file is a sequence of TFRecords (uint64 length, masked
CRC-32C of the length, payload, masked CRC-32C of the payload), each payload
a serialized ``tensorboard.Event``. Only the fields scalar logging needs are
encoded here (wall_time, step, file_version, a Summary of simple values, a
SessionLog status), so writing needs neither TensorFlow nor tensorboard.
"""

from __future__ import annotations

import struct
from typing import Sequence

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, RFC 3720 appendix B.4) of ``data`` as a uint32."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 and add 0xA282EAD8 (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of it, data, masked CRC of data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64s take ten bytes, as in protobuf
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
  return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def scalar_summary(scalars: Sequence[tuple[str, float]]) -> bytes:
  """A serialized ``Summary`` of ``Value{tag=1, simple_value=2 (float32)}``s."""
  return b"".join(
      _length_delimited(1, _length_delimited(1, tag.encode("utf-8")) +
                        b"\x15" + struct.pack("<f", value))
      for tag, value in scalars)


SESSION_LOG_START = 1


def encode_event(wall_time: float, step: int, *,
                 file_version: str | None = None,
                 summary: bytes | None = None,
                 session_log_status: int | None = None) -> bytes:
  """A serialized ``tensorboard.Event`` (wall_time=1 double, step=2 int64,
  file_version=3, summary=5, session_log=7 with its status=1 enum)."""
  out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode("utf-8"))
  if summary is not None:
    out += _length_delimited(5, summary)
  if session_log_status is not None:
    out += _length_delimited(7, b"\x08" + _varint(session_log_status))
  return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not byte & 0x80:
      return value, pos


def _fields(event: bytes):
  """``(field number, wire type, value)`` of a serialized message's fields
  (varints as ints, length-delimited fields as bytes, fixed ones as None)."""
  pos = 0
  while pos < len(event):
    key, pos = _read_varint(event, pos)
    wire_type = key & 7
    if wire_type == 0:
      value, pos = _read_varint(event, pos)
      yield key >> 3, wire_type, value
    elif wire_type == 2:
      length, pos = _read_varint(event, pos)
      yield key >> 3, wire_type, event[pos:pos + length]
      pos += length
    else:  # 1: 64-bit, 5: 32-bit
      pos += 8 if wire_type == 1 else 4
      yield key >> 3, wire_type, None


def event_step(event: bytes) -> int:
  """The step (field 2, int64) of a serialized Event; 0 when absent."""
  for number, wire_type, value in _fields(event):
    if number == 2 and wire_type == 0:
      return value - (1 << 64) if value >> 63 else value
  return 0


def event_has_summary(event: bytes) -> bool:
  """Whether a serialized Event carries a Summary (field 5), i.e. values."""
  return any(number == 5 and wire_type == 2
             for number, wire_type, _ in _fields(event))


def read_tfrecords(path: str) -> list[bytes]:
  """The payloads of a TFRecord file, up to its first torn or corrupt record."""
  with open(path, "rb") as f:
    data = f.read()
  payloads, pos = [], 0
  while pos + 12 <= len(data):
    header, header_crc = data[pos:pos + 8], data[pos + 8:pos + 12]
    end = pos + 16 + struct.unpack("<Q", header)[0]
    payload = data[pos + 12:end - 4]
    if (end > len(data) or
        struct.unpack("<I", header_crc)[0] != masked_crc32c(header) or
        struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(payload)):
      break
    payloads.append(payload)
    pos = end
  return payloads
