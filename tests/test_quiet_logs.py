"""Library INFO lines are filtered; this project's INFO lines and every warning pass."""

import logging
import os

import pytest

from slim_jax import quiet_logs


def record(pathname: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


@pytest.fixture
def handler():
  h = logging.StreamHandler()
  root = logging.getLogger()
  root.addHandler(h)
  yield h
  root.removeHandler(h)


def test_library_info_is_dropped_and_own_info_and_warnings_pass(handler):
  quiet_logs.quiet_library_logs(0)
  quiet_logs.quiet_library_logs(0)  # idempotent
  assert sum(isinstance(f, quiet_logs.OwnInfoOnly) for f in handler.filters) == 1
  orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
  httpx = "/venv/lib/python3.11/site-packages/httpx/_client.py"
  own = os.path.join(os.path.dirname(quiet_logs.__file__), "train", "distill.py")
  script = os.path.join(os.path.dirname(os.path.dirname(quiet_logs.__file__)),
                        "experiments", "teacher.py")
  assert not handler.filter(record(orbax, logging.INFO))
  assert not handler.filter(record(httpx, logging.INFO))
  assert handler.filter(record(own, logging.INFO))
  assert handler.filter(record(script, logging.INFO))
  assert handler.filter(record(orbax, logging.WARNING))


def test_verbosity_one_keeps_every_line(handler):
  quiet_logs.quiet_library_logs(1)
  assert not handler.filters
