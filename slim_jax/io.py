"""The one way artifacts are written: a temporary file next to the target, flushed, fsynced
and renamed onto it, so a reader (or a rerun after a kill) sees the old file or the new
one, never half of one.

Temporary names are `<name>.tmp-<pid>-<random>` in the target's folder: unique per
process and per call, so two processes writing the same artifact never share one, and a
leftover from a killed run is recognisable (`is_temporary`) and never mistaken for output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

TEMP_MARK = ".tmp-"


def temporary_name(path: str) -> str:
  return f"{path}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temporary(name: str) -> bool:
  return TEMP_MARK in os.path.basename(name)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """`with atomic_path(path) as tmp: library.save(obj, tmp)` for writers that take a file
  name (safetensors, orbax): `tmp` is fsynced and renamed onto `path` on success, removed on
  an exception."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temporary_name(path)
  try:
    yield tmp
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """`with atomic_open(path) as f: ...` writes `path` atomically ('w' text, 'wb' bytes).
  On an exception the temporary file is removed and `path` is left as it was."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open: mode {mode!r} is not 'w' or 'wb'")
  with atomic_path(path) as tmp:
    with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
      yield f


class Locked(RuntimeError):
  """Another process holds the lock; `holder` is its pid as it wrote it ('unknown' if not)."""

  def __init__(self, path: str, holder: str):
    super().__init__(f"{path} is held by pid {holder}")
    self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
  """Holds an flock on `path` (released when the process ends, however it ends) and writes
  this process's pid into it; raises Locked at once if another process holds it."""
  import fcntl  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise Locked(path, f.read().strip() or "unknown") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    yield


def write_text(path: str, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def save_npy(path: str, array) -> None:
  """A numpy array as .npy, atomically."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  with atomic_open(path, "wb") as f:
    np.save(f, array)


def write_json(path: str, value: Any, *, indent: int | None = 2, default=None,
               sort_keys: bool = False) -> None:
  with atomic_open(path) as f:
    json.dump(value, f, indent=indent, default=default, sort_keys=sort_keys,
              ensure_ascii=False)
    f.write("\n")


def write_jsonl(path: str, rows: Iterable[Any]) -> None:
  with atomic_open(path) as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def fingerprint(value: Any) -> str:
  """sha256 of a JSON-able value in canonical form (sorted keys): the identity of what a
  stage or a unit of work was made from."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: str, what: str = "file") -> Any:
  """The JSON value of `path`; a clear ValueError naming the file when it is not JSON."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: this {what} is not valid JSON ({e}); delete it and rerun "
                       "the step that writes it") from e


def hash_path(path: str) -> str | None:
  """sha256 of a file, or of a folder's (relative name, content) pairs; None if missing."""
  if not os.path.exists(path):
    return None
  digest = hashlib.sha256()
  if os.path.isfile(path):
    files = [(os.path.basename(path), path)]
  else:
    files = []
    for root, dirs, names in os.walk(path):
      dirs.sort()
      files += [(os.path.relpath(os.path.join(root, n), path), os.path.join(root, n))
                for n in sorted(names) if not is_temporary(n)]
  for rel, full in files:
    digest.update(rel.encode() + b"\0")
    with open(full, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def stat_signature(path: str) -> list | None:
  """(relative name, size, modification time) of a file or of each file in a folder: a cheap
  identity for large read-only inputs (model weights) where hashing the contents is slow."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    stat = os.stat(path)
    return [[os.path.basename(path), stat.st_size, stat.st_mtime_ns]]
  out = []
  for root, dirs, names in os.walk(path):
    dirs.sort()
    for n in sorted(names):
      stat = os.stat(os.path.join(root, n))
      out.append([os.path.relpath(os.path.join(root, n), path), stat.st_size, stat.st_mtime_ns])
  return out


# ----------------------------------------------------------------------------- JSONL


def has_torn_tail(path: str) -> bool:
  """Whether the file ends inside a line (a writer was killed mid-append)."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return False
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def _complete_json(line: bytes) -> bool:
  try:
    json.loads(line)
    return True
  except (json.JSONDecodeError, UnicodeDecodeError):
    return False


def cut_torn_tail(path: str) -> int:
  """Makes the file end with a newline before an append: a last line that is whole JSON
  (written by hand without a newline) gets one; a torn line (a writer killed mid-append)
  is truncated. Returns the bytes removed."""
  if not has_torn_tail(path):
    return 0
  with open(path, "rb+") as f:
    data = f.read()
    keep = data.rfind(b"\n") + 1
    if _complete_json(data[keep:]):
      f.write(b"\n")
      keep = len(data) + 1
    else:
      f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
  if keep > len(data):
    return 0
  logging.warning("%s: removed an incomplete last line (%d bytes) left by an interrupted run",
                  path, len(data) - keep)
  return len(data) - keep


def read_jsonl(path: str, validate: Callable[[Any, str], None] | None = None,
               what: str = "line", hint: str = "fix or delete that line and rerun",
               skipped: list[str] | None = None) -> list:
  """Every complete line's value, in order. A torn last line (no newline and not whole
  JSON: an interrupted append) is skipped with a warning; any other line that is not JSON,
  or that `validate(value, 'path:line')` rejects with a ValueError, is an error naming
  path:line, or, when a `skipped` list is given, is skipped and its reason appended."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  torn = lines.pop()  # b"" when the file ends with a newline
  if torn.strip() and _complete_json(torn):  # a last line without its newline, not torn
    lines.append(torn)
    torn = b""
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      value = json.loads(line)
      if validate is not None:
        validate(value, where)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
      if skipped is None:
        raise ValueError(f"{where}: malformed {what} ({e}); {hint}") from e
      skipped.append(f"{where}: malformed {what} ({e})")
      continue
    rows.append(value)
  if torn.strip():
    if skipped is not None:
      skipped.append(f"{path}:{len(lines) + 1}: incomplete last line (an interrupted writer)")
    logging.warning("%s: ignoring an incomplete last line (%d bytes) left by an interrupted "
                    "run; it is removed on the next append", path, len(torn))
  return rows


class JsonlAppender:
  """Appends values one complete, fsynced line at a time (a torn last line left by a killed
  writer is cut first); safe to share between threads."""

  def __init__(self, path: str, validate: Callable[[Any, str], None] | None = None):
    self.path, self.validate = path, validate
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cut_torn_tail(path)
    self._file = open(path, "ab")  # pylint: disable=consider-using-with
    self._lock = threading.Lock()

  def append(self, value: Any) -> None:
    if self.validate is not None:
      self.validate(value, f"{self.path} (new line)")
    line = (json.dumps(value, ensure_ascii=False) + "\n").encode("utf-8")
    with self._lock:
      self._file.write(line)
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self) -> None:
    with self._lock:
      if not self._file.closed:
        self._file.close()

  def __enter__(self) -> "JsonlAppender":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
