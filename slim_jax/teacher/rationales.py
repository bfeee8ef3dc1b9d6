"""The rationale JSONL file shared by the teacher stage and the student generation stage.

One JSON object per line and per user (DESIGN.md, "Artifacts between stages"):
  user_id        dense user id (int)
  messages       the chat prompt, [{"role", "content"}, ...]
  response       the raw rationale text, kept even when it does not parse
  steps          {"step1", "step2", "step3"} texts (a missing step is null), or null when
                 the response has no step structure (`prompts.parse_steps`)
  model          the model name the endpoint reported
  usage          {"prompt_tokens", "completion_tokens"}
  created        unix seconds
  finish_reason  "stop" or "length" (extra: a truncated rationale is worth knowing about)

Each record is appended as one complete line with a single write, then flushed and fsynced,
so a stage killed at any moment leaves every finished user on disk and a rerun asks only for
the users not yet done. A line torn by a crash (the last line, without its newline) is
ignored on reading and cut off before the next append.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable

from slim_jax.teacher import prompts

REQUIRED_KEYS = ("user_id", "messages", "response", "steps", "model", "usage", "created")


def make_record(*, user_id: int, messages: list[dict], response: str, model: str,
                prompt_tokens: int | None, completion_tokens: int | None,
                finish_reason: str | None = None, created: int | None = None) -> dict:
  """A schema-complete record; the steps come from `prompts.parse_steps` (None on failure)."""
  return {
      "user_id": int(user_id),
      "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
      "response": response,
      "steps": prompts.parse_steps(response),
      "model": model,
      "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
      "created": int(time.time()) if created is None else int(created),
      "finish_reason": finish_reason,
  }


def validate(record: dict, where: str = "record") -> None:
  missing = [k for k in REQUIRED_KEYS if k not in record]
  if missing:
    raise ValueError(f"{where}: missing keys {missing}")
  if not isinstance(record["user_id"], int) or isinstance(record["user_id"], bool):
    raise ValueError(f"{where}: user_id must be an int, got {record['user_id']!r}")
  if not isinstance(record["response"], str):
    raise ValueError(f"{where}: response must be a string")
  steps = record["steps"]
  if steps is not None and set(steps) != set(prompts.STEP_KEYS):
    raise ValueError(f"{where}: steps must be null or have keys {prompts.STEP_KEYS}")


def read(path: str) -> list[dict]:
  """All records in file order; a torn last line is skipped, any other bad line is an error."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  torn = lines.pop()  # b"" when the file ends with a newline
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      validate(record, f"{path}:{number}")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
      raise ValueError(f"{path}:{number}: malformed rationale line ({e}); fix or delete that "
                       "line and rerun (the users on deleted lines are asked again)") from e
    records.append(record)
  if torn.strip():
    logging.warning("%s: ignoring an incomplete last line (%d bytes) left by an interrupted "
                    "run; it is removed on the next append", path, len(torn))
  return records


def by_user(records: Iterable[dict]) -> dict[int, dict]:
  """user_id -> record; the first record of a user wins (see `dedupe`)."""
  out: dict[int, dict] = {}
  for record in records:
    out.setdefault(record["user_id"], record)
  return out


def done_users(path: str) -> set[int]:
  return {record["user_id"] for record in read(path)}


def _write_atomic(path: str, records: Iterable[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def dedupe(path: str) -> int:
  """Keeps the first record of each user (rewritten atomically); returns how many it dropped."""
  records = read(path)
  unique = list(by_user(records).values())
  if len(unique) != len(records) or _has_torn_tail(path):
    _write_atomic(path, unique)
  return len(records) - len(unique)


def _has_torn_tail(path: str) -> bool:
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return False
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def _cut_torn_tail(path: str) -> None:
  """Truncates the file after its last newline, so the next append starts a clean line."""
  if not _has_torn_tail(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    keep = data.rfind(b"\n") + 1
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
  logging.warning("%s: removed an incomplete last line (%d bytes) left by an interrupted run",
                  path, len(data) - keep)


class Appender:
  """Appends records one complete, fsynced line at a time; safe to share between threads."""

  def __init__(self, path: str):
    self.path = path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _cut_torn_tail(path)
    self._file = open(path, "ab")
    self._lock = threading.Lock()

  def append(self, record: dict) -> None:
    validate(record)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with self._lock:
      self._file.write(line)
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self) -> None:
    with self._lock:
      if not self._file.closed:
        self._file.close()

  def __enter__(self) -> "Appender":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
