"""A long-lived benchmark worker in its own process, driven one JSON line at a time.

benchmarks/recommenders.py times the project and RecBole, which live in two virtual
environments (RecBole 1.2.1 needs numpy < 2). Each side runs as a worker process; the
driver sends `{"op": name, **kwargs}` lines and reads one `{"ok": true, ...}` or
`{"ok": false, "error": ...}` line back, so the two sides can be called alternately.
This file imports nothing beyond the standard library: both environments load it.

  worker side:  serve({"epoch": fn, ...})      fn(**kwargs) -> dict
  driver side:  w = Worker([python, script]); w.call("epoch"); w.close()
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence


def peak_rss_bytes() -> int:
  """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
  """Answers requests on stdin until EOF; anything the handlers print goes to stderr."""
  reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # libraries' prints must not mix in
  handlers = {"peak_rss": lambda: {"bytes": peak_rss_bytes()}, **handlers}
  for line in sys.stdin:
    if not line.strip():
      continue
    request = json.loads(line)
    op = request.pop("op")
    try:
      if op not in handlers:
        raise ValueError(f"unknown op {op!r}; known: {sorted(handlers)}")
      answer = {"ok": True, **handlers[op](**request)}
    except Exception as e:  # reported to the driver, which decides
      traceback.print_exc()
      answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    reply.write(json.dumps(answer) + "\n")


class WorkerError(RuntimeError):
  pass


class Worker:
  """The driver's handle on one worker process."""

  def __init__(self, command: Sequence[str], *, log_path: str | None = None,
               cwd: str | None = None, env: dict[str, str] | None = None):
    """`env`: variables added to this process's environment for the worker."""
    self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
    self.command = list(command)
    self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._log, text=True, bufsize=1, cwd=cwd,
                                 env={**os.environ, **(env or {})})

  def call(self, op: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise WorkerError(f"{self.command[1]} exited (code {self.proc.wait()}) during {op!r}; "
                        "see its log")
    answer = json.loads(line)
    if not answer.pop("ok"):
      raise WorkerError(f"{self.command[1]} failed in {op!r}: {answer['error']}")
    return answer

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
    if self._log is not subprocess.DEVNULL:
      self._log.close()
