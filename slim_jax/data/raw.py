"""Raw interactions as the loaders read them, before any filtering, and the bad-line policy.

Every source loader (MovieLens, Amazon) streams its files line by line into a
`RawData`: three compact arrays (user code, item code, unix time) in file order, the
string ids behind the codes, a function that reads item metadata for the items that
survive filtering (so metadata of a multi-gigabyte category is parsed only where needed),
and a report of what was read. `slim_jax.data.prepare` turns a `RawData` into a
`SequenceDataset`.

A malformed line raises `MalformedLineError` naming file and line number, unless the
loader was asked to skip bad lines; then `BadLines` counts them per file and reason.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import gzip
import os
import zlib
from collections.abc import Callable, Iterator

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_EXAMPLES = 5


class MalformedLineError(ValueError):
  """A source line that cannot be parsed; the message names file and line number."""


@dataclasses.dataclass(frozen=True)
class ItemMeta:
  """What a source knows about one item; `text` is the description the encoder reads."""

  title: str
  brand: str
  categories: tuple[str, ...]
  text: str


class BadLines:
  """Raises on a malformed line, or (skip=True) counts it per file and reason."""

  def __init__(self, skip: bool):
    self.skip = skip
    self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
    self.examples: list[str] = []

  def report(self, path: str, line_number: int, reason: str) -> None:
    where = f"{path}:{line_number}"
    if not self.skip:
      raise MalformedLineError(
          f"{where}: malformed line ({reason}). Fix or delete the line, or pass "
          "--skip_bad_lines (skip_bad_lines=True) to count and skip such lines.")
    self.counts[(os.path.basename(path), reason)] += 1
    if len(self.examples) < _MAX_EXAMPLES:
      self.examples.append(f"{where}: {reason}")

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> dict:
    by_file: dict[str, dict[str, int]] = {}
    for (name, reason), count in sorted(self.counts.items()):
      by_file.setdefault(name, {})[reason] = count
    return {"total": self.total, "by_file": by_file, "examples": list(self.examples)}


def is_gzip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(2) == _GZIP_MAGIC


def read_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line without the newline) from a text or gzip file.

  Streams: only one line is held at a time. A damaged gzip stream raises an error naming
  the file and the last good line.
  """
  opener = gzip.open if is_gzip(path) else open
  line_number = 0
  try:
    with opener(path, "rt", encoding="utf-8", errors="strict", newline="\n") as f:
      for line_number, line in enumerate(f, 1):
        yield line_number, line.rstrip("\r\n")
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path}: the compressed file is damaged or truncated after line "
                     f"{line_number} ({e}); download it again") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}:{line_number + 1}: not UTF-8 text ({e})") from e


class Interner:
  """Maps string ids to dense int codes in order of first appearance."""

  def __init__(self):
    self.codes: dict[str, int] = {}
    self.names: list[str] = []

  def __call__(self, name: str) -> int:
    code = self.codes.get(name)
    if code is None:
      code = self.codes[name] = len(self.names)
      self.names.append(name)
    return code

  def __len__(self) -> int:
    return len(self.names)


class InteractionLog:
  """Append-only (user, item, time) records in file order, stored as compact arrays."""

  def __init__(self):
    self.users = Interner()
    self.items = Interner()
    self._user = array.array("i")
    self._item = array.array("i")
    self._time = array.array("q")

  def add(self, user: str, item: str, timestamp: int) -> None:
    self._user.append(self.users(user))
    self._item.append(self.items(item))
    self._time.append(timestamp)

  def __len__(self) -> int:
    return len(self._user)

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user codes [M] int32, item codes [M] int32, times [M] int64), file order."""
    return (np.frombuffer(self._user, np.int32).copy(),
            np.frombuffer(self._item, np.int32).copy(),
            np.frombuffer(self._time, np.int64).copy())


@dataclasses.dataclass
class RawData:
  """A source's interactions plus a reader for the metadata of the items kept."""

  log: InteractionLog
  read_meta: Callable[[set[str]], dict[str, ItemMeta]]
  bad_lines: BadLines
  report: dict  # source, files, lines read, blank lines, ... (goes into data_summary.json)


def describe(fields) -> str:
  """The item description f_i from (label, value) pairs: 'Title: X; Brand: Y; Categories: a, b'.

  A value may be a string or a sequence of strings (joined with ', '); empty values are
  left out, so a missing brand does not leave 'Brand: ' behind.
  """
  parts = []
  for label, value in fields:
    if not isinstance(value, str):
      value = ", ".join(value)
    if value:
      parts.append(f"{label}: {value}")
  return "; ".join(parts)
