"""Library log lines stay at WARNING unless --verbosity asks for more.

Orbax logs every checkpoint save and restore at INFO through absl, the openai client's
httpx one line per request, transformers an advisory line at import when torch is absent.
Our own INFO lines (stage progress, resumes) are what a user reads, so the filter is by
source file: a record below WARNING passes only when it was logged from this project's code
(slim_jax/, experiments/, benchmarks/). At `--verbosity=1` (absl's DEBUG) or more,
everything passes.
"""

from __future__ import annotations

import logging
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_PACKAGE)
OWN_CODE = tuple(os.path.join(p, "") for p in (
    _PACKAGE, os.path.join(_ROOT, "experiments"), os.path.join(_ROOT, "benchmarks")))


class OwnInfoOnly(logging.Filter):
  """Passes WARNING and above from anywhere, lower levels from this project's files only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(OWN_CODE)


def quiet_library_logs(verbosity: int = 0) -> None:
  """Installs OwnInfoOnly on the root logger's handlers (absl's among them) unless
  `verbosity` >= 1. Call it after the handlers exist: absl's comes with `absl.logging`,
  `logging.basicConfig` makes one. Idempotent."""
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  if verbosity >= 1:
    return
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, OwnInfoOnly) for f in handler.filters):
      handler.addFilter(OwnInfoOnly())
