"""Training metrics to TensorBoard event files and to a JSONL file, in one call.

`MetricsWriter(logdir).write(step, {"train/loss": 1.2, ...})` appends one JSON line
`{"step": 10, "time": ..., "train/loss": 1.2}` to `metrics.jsonl` and one scalar per key
to the TensorBoard event file (tensorboardX). A resumed run passes `resume_step`: lines
of the interrupted run logged after its last checkpoint are removed, so the JSONL holds
each step once and reads like an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np

from slim_jax import io

METRICS_FILE = "metrics.jsonl"


def read_metrics(logdir: str) -> list[dict]:
  """All lines of `metrics.jsonl` (a torn last line, from a kill, is skipped)."""
  return io.read_jsonl(os.path.join(logdir, METRICS_FILE), what="metrics line")


class MetricsWriter:
  """Writes scalars to `logdir/metrics.jsonl` and TensorBoard event files in `logdir`."""

  def __init__(self, logdir: str, resume_step: int | None = None, tensorboard: bool = True,
               enabled: bool = True):
    """`enabled=False` (every process of a multi-process run but the first) writes
    nothing, so the run's files are written once."""
    self.logdir = logdir
    self.path = os.path.join(logdir, METRICS_FILE)
    self._jsonl = self._tb = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    if os.path.exists(self.path):
      keep = [] if resume_step is None else [
          r for r in read_metrics(logdir) if r.get("step", 0) <= resume_step]
      io.write_jsonl(self.path, keep)
    self._jsonl = io.JsonlAppender(self.path)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=logdir, purge_step=resume_step)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._jsonl is None:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._jsonl.append({"step": int(step), "time": time.time(), **values})
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, int(step))

  def flush(self) -> None:  # metrics lines are fsynced as they are written
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
