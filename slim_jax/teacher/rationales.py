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
  cutoff         how many training-prefix items the prompt was written from (prompts.py:
                 the rationale is visible only at positions whose history holds them all);
                 absent in files written before it existed, read as the whole prefix

Each record is appended as one complete line with a single write, then flushed and fsynced,
so a stage killed at any moment leaves every finished user on disk and a rerun asks only for
the users not yet done. A line torn by a crash (the last line, without its newline) is
ignored on reading and cut off before the next append.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from slim_jax.teacher import prompts
from slim_jax import io

REQUIRED_KEYS = ("user_id", "messages", "response", "steps", "model", "usage", "created")


def make_record(*, user_id: int, messages: list[dict], response: str, model: str,
                prompt_tokens: int | None, completion_tokens: int | None,
                finish_reason: str | None = None, created: int | None = None,
                cutoff: int | None = None) -> dict:
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
      **({} if cutoff is None else {"cutoff": int(cutoff)}),
  }


def validate(record: dict, where: str = "record") -> None:
  missing = [k for k in REQUIRED_KEYS if k not in record]
  if missing:
    raise ValueError(f"{where}: missing keys {missing}")
  if not isinstance(record["user_id"], int) or isinstance(record["user_id"], bool):
    raise ValueError(f"{where}: user_id must be an int, got {record['user_id']!r}")
  if not isinstance(record["response"], str):
    raise ValueError(f"{where}: response must be a string")
  cutoff = record.get("cutoff")
  if cutoff is not None and (not isinstance(cutoff, int) or isinstance(cutoff, bool)
                             or cutoff < 1):
    raise ValueError(f"{where}: cutoff must be a positive int, got {cutoff!r}")
  steps = record["steps"]
  if steps is not None and set(steps) != set(prompts.STEP_KEYS):
    raise ValueError(f"{where}: steps must be null or have keys {prompts.STEP_KEYS}")


def read(path: str) -> list[dict]:
  """All records in file order; a torn last line is skipped, any other bad line is an error."""
  return io.read_jsonl(path, validate, what="rationale line",
                       hint="fix or delete that line and rerun (the users on deleted lines "
                       "are asked again)")


def by_user(records: Iterable[dict]) -> dict[int, dict]:
  """user_id -> record; the first record of a user wins (see `dedupe`)."""
  out: dict[int, dict] = {}
  for record in records:
    out.setdefault(record["user_id"], record)
  return out


def done_users(path: str) -> set[int]:
  return {record["user_id"] for record in read(path)}



def dedupe(path: str, keep: Callable[[dict], bool] | None = None) -> int:
  """Keeps the first record of each user, of those `keep` accepts (all by default);
  rewritten atomically; returns how many it dropped."""
  records = read(path)
  unique = list(by_user(r for r in records if keep is None or keep(r)).values())
  if len(unique) != len(records) or io.has_torn_tail(path):
    io.write_jsonl(path, unique)
  return len(records) - len(unique)


class Appender(io.JsonlAppender):
  """Appends schema-checked records one complete, fsynced line at a time; thread-safe."""

  def __init__(self, path: str):
    super().__init__(path, validate)
