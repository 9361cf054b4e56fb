"""The undo journal and file helpers of
:class:`~fedjax_lab.engine.disk_states.DiskClientStates`.

A journal segment is one append-only file of entries; an entry holds, for
one scatter, the rows' old values *before* they were overwritten: the client
indices (``int64 [R]``), the old "written" flags (``uint8 [R]``) and each
leaf's old rows (``[R, *leaf_shape]`` in the leaf's dtype), in that order.

On disk an entry is a 16-byte header (``b"UNDO"``, the payload length as
``uint64`` little-endian, the payload's CRC-32 as ``uint32``) and the payload.
A torn tail (a crash while appending: short header, short payload or a CRC
mismatch) ends the segment: that entry and anything after it are ignored.
This is safe because the store overwrites rows only after the entry is
completely written (and, when durable, fsync'd).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import zlib
from typing import Sequence

import numpy as np

_MAGIC = b"UNDO"
_HEADER = struct.Struct("<4sQI")


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """Shape (without the client axis) and dtype of one stored leaf."""

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def row_bytes(self) -> int:
    """Bytes of one client's row of this leaf."""
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass
class UndoEntry:
  """The old values of the rows one scatter overwrote.

  Attributes:
    indices: ``int64 [R]`` client indices (repeats allowed).
    written: ``uint8 [R]`` the rows' old "written" flags.
    leaves: per leaf, ``[R, *shape]`` old rows.
  """

  indices: np.ndarray
  written: np.ndarray
  leaves: list[np.ndarray]


def encode_entry(entry: UndoEntry) -> bytes:
  """The on-disk bytes (header + payload) of ``entry``."""
  count = np.int64(len(entry.indices))
  parts = [count.tobytes(),
           np.ascontiguousarray(entry.indices, np.int64).tobytes(),
           np.ascontiguousarray(entry.written, np.uint8).tobytes()]
  parts += [np.ascontiguousarray(leaf).tobytes() for leaf in entry.leaves]
  payload = b"".join(parts)
  return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes, layouts: Sequence[LeafLayout]
                    ) -> UndoEntry | None:
  """The entry in ``payload``; None when its sizes do not add up."""
  if len(payload) < 8:
    return None
  count = int(np.frombuffer(payload, np.int64, 1)[0])
  expected = 8 + count * (9 + sum(l.row_bytes for l in layouts))
  if count < 0 or expected != len(payload):
    return None
  offset = 8
  indices = np.frombuffer(payload, np.int64, count, offset)
  offset += 8 * count
  written = np.frombuffer(payload, np.uint8, count, offset)
  offset += count
  leaves = []
  for layout in layouts:
    size = count * layout.row_bytes
    leaves.append(np.frombuffer(payload[offset:offset + size], layout.dtype)
                  .reshape((count,) + layout.shape))
    offset += size
  return UndoEntry(indices, written, leaves)


def read_entries(path: str, layouts: Sequence[LeafLayout]
                 ) -> tuple[list[UndoEntry], int]:
  """The complete entries of a segment, oldest first, and the byte length
  of that valid prefix (a torn or corrupt tail is left out)."""
  entries: list[UndoEntry] = []
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset + _HEADER.size <= len(data):
    magic, length, crc = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    payload = data[start:start + length]
    if (magic != _MAGIC or len(payload) != length or
        zlib.crc32(payload) != crc):
      break
    entry = _decode_payload(payload, layouts)
    if entry is None:
      break
    entries.append(entry)
    offset = start + length
  return entries, offset


def segment_name(base_round: int) -> str:
  """File name of the segment holding the undo entries written after the
  commit of ``base_round``."""
  return f"after-{base_round:012d}.undo"


def segment_bases(directory: str) -> list[int]:
  """Base rounds of the segments in ``directory``, ascending."""
  bases = []
  for name in os.listdir(directory):
    if name.startswith("after-") and name.endswith(".undo"):
      try:
        bases.append(int(name[len("after-"):-len(".undo")]))
      except ValueError:
        continue
  return sorted(bases)


def fsync_directory(directory: str) -> None:
  """Makes the directory's entries (creations, renames, unlinks) durable."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_file_atomically(path: str, data: bytes) -> int:
  """Replaces ``path`` by ``data`` (temp file, fsync, rename, fsync of the
  directory); returns the bytes written."""
  temporary = path + ".tmp"
  fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    os.write(fd, data)
    os.fsync(fd)
  finally:
    os.close(fd)
  os.replace(temporary, path)
  fsync_directory(os.path.dirname(os.path.abspath(path)))
  return len(data)


def map_npy(path: str) -> tuple[mmap.mmap, np.ndarray]:
  """A writable memory map of an ``.npy`` file and the array over it.

  The map is advised ``MADV_RANDOM``: a round touches scattered rows, and
  the default readahead around each fault (up to 100x slower on sparse
  files) would read pages no client asked for.
  """
  with open(path, "r+b") as f:
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    offset = f.tell()
    mapped = mmap.mmap(f.fileno(), 0)
  if fortran:
    raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
  if hasattr(mmap, "MADV_RANDOM"):
    mapped.madvise(mmap.MADV_RANDOM)
  return mapped, np.ndarray(shape, dtype, buffer=mapped, offset=offset)
