"""The stage runner of experiments/run_slim.py: fingerprinted stages that never reuse a stale
result.

A `Stage` names its input paths, its parameters (anything that changes its result), its
output paths, the paths of its work (outputs plus partial work such as checkpoints; by
default the outputs) and a `run(fingerprint)` callable. Its fingerprint is the sha256 of
the content hashes of its inputs (a folder is hashed file by file, in sorted order,
temporary files left out) and its parameters.

Per stage, `<workdir>/pipeline/<stage>.json` (the manifest) records the fingerprint of the
last finished run, and `<stage>.started.json` the fingerprint of a run in progress, written
before the stage does any work and removed when it finishes. Before a stage:

- manifest fingerprint == current, outputs present, not forced: skipped;
- the work on disk (the started marker's fingerprint, else the manifest's) was made under
  the current fingerprint: the stage runs and may resume its own partial work (users,
  seeds, checkpoints);
- anything else (other fingerprint, unreadable manifest, work of unknown origin, forced):
  the stage's work paths are deleted first, so it recomputes from scratch.

Stages pass the fingerprint on to the units of work they write, which record it. A forced
stage forces every stage downstream of it (reading, directly or not, one of its outputs).
A progress line per stage reports the time taken and an estimate of the time left, from
each stage's expected seconds scaled by how fast the finished stages went.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Collection, Sequence

from slim_jax import io

MANIFEST_DIR = "pipeline"
_MANIFEST_JSON = {"indent": 1, "sort_keys": True, "default": str}


@dataclasses.dataclass
class Stage:
  name: str
  run: Callable[[str], object]  # run(fingerprint)
  inputs: Sequence[str] = ()
  outputs: Sequence[str] = ()
  params: dict = dataclasses.field(default_factory=dict)
  work: Sequence[str] | None = None  # deleted before a recompute; None: the outputs
  expected_seconds: float = 60.0

  @property
  def work_paths(self) -> Sequence[str]:
    return self.outputs if self.work is None else self.work


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return path == folder or path.startswith(os.path.join(folder, ""))


def downstream(stages: Sequence[Stage], names: Collection[str]) -> set[str]:
  """`names` and every stage that reads, directly or not, an output of one of them."""
  unknown = set(names) - {s.name for s in stages}
  if unknown:
    raise ValueError(f"unknown stage(s) {sorted(unknown)}; the stages are "
                     f"{[s.name for s in stages]}")
  chosen, produced = set(names), []
  for stage in stages:
    if stage.name not in chosen and any(_inside(i, o) or _inside(o, i)
                                        for i in stage.inputs for o in produced):
      chosen.add(stage.name)
    if stage.name in chosen:
      produced += list(stage.outputs)
  return chosen


def remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


class WorkdirLocked(RuntimeError):
  pass


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `<workdir>/pipeline/lock` (an flock, released when the process ends, however it
  ends) for the duration; a second run on the same workdir fails at once, naming the pid
  of the run that holds it."""
  path = os.path.join(workdir, MANIFEST_DIR, "lock")
  try:
    with io.exclusive_lock(path):
      yield
  except io.Locked as e:
    raise WorkdirLocked(f"{workdir} is in use by another run (pid {e.holder}, lock {path}); "
                        "wait for it to finish, stop it, or use another --workdir") from None


class Pipeline:
  """Runs stages in order; records per stage whether it ran or was skipped, and its time."""

  def __init__(self, workdir: str, log: Callable[[str], None] = print):
    self.workdir, self.log = workdir, log
    self.dir = os.path.join(workdir, MANIFEST_DIR)
    os.makedirs(self.dir, exist_ok=True)
    self.record: list[dict] = []

  def _manifest(self, stage: Stage) -> str:
    return os.path.join(self.dir, f"{stage.name}.json")

  def _marker(self, stage: Stage) -> str:
    return os.path.join(self.dir, f"{stage.name}.started.json")

  def wanted(self, stage: Stage) -> dict:
    """{'fingerprint', 'inputs', 'params'} of the stage as it would run now."""
    wanted = {"inputs": {p: io.hash_path(p) for p in stage.inputs},
              "params": json.loads(json.dumps(stage.params, sort_keys=True, default=str))}
    wanted["fingerprint"] = io.fingerprint(wanted)
    return wanted

  def _stored_fingerprint(self, path: str) -> str | None:
    """The fingerprint a manifest or marker records; None if missing or unreadable."""
    if not os.path.exists(path):
      return None
    with contextlib.suppress(ValueError, OSError, AttributeError):
      value = io.read_json(path).get("fingerprint")
      return value if isinstance(value, str) else None
    return None

  def up_to_date(self, stage: Stage, fingerprint: str | None = None) -> bool:
    fingerprint = fingerprint or self.wanted(stage)["fingerprint"]
    return (self._stored_fingerprint(self._manifest(stage)) == fingerprint
            and all(os.path.exists(p) for p in stage.outputs))

  def _prepare_work(self, stage: Stage, fingerprint: str, forced: bool) -> None:
    """Deletes the stage's work unless it was made under `fingerprint`."""
    marker = self._marker(stage)
    made_under = (self._stored_fingerprint(marker) if os.path.exists(marker)
                  else self._stored_fingerprint(self._manifest(stage)))
    if forced or made_under != fingerprint:
      for path in stage.work_paths:
        remove(path)
    remove(self._manifest(stage))
    io.write_json(marker, {"fingerprint": fingerprint, "started": time.time()},
                  **_MANIFEST_JSON)

  def run(self, stages: Sequence[Stage], force: Collection[str] = ()) -> list[dict]:
    forced = downstream(stages, force) if force else set()
    expected = [s.expected_seconds for s in stages]
    spent_actual = spent_expected = 0.0
    for i, stage in enumerate(stages):
      start = time.perf_counter()
      wanted = self.wanted(stage)
      if stage.name not in forced and self.up_to_date(stage, wanted["fingerprint"]):
        status = "skipped"
      else:
        self._prepare_work(stage, wanted["fingerprint"], stage.name in forced)
        stage.run(wanted["fingerprint"])
        missing = [p for p in stage.outputs if not os.path.exists(p)]
        if missing:
          raise RuntimeError(f"stage {stage.name} finished without writing {missing}")
        io.write_json(self._manifest(stage),
                      {**wanted, "finished": time.time(),
                       "seconds": time.perf_counter() - start}, **_MANIFEST_JSON)
        remove(self._marker(stage))
        status = "done"
      seconds = time.perf_counter() - start
      if status == "done":
        spent_actual += seconds
        spent_expected += expected[i]
      # Scale the plan by the observed speed once enough of it has run to be a measurement.
      speed = spent_actual / spent_expected if spent_expected >= 60 else 1.0
      left = speed * sum(expected[i + 1:])
      self.record.append({"stage": stage.name, "status": status, "seconds": round(seconds, 2)})
      self.log(f"[{i + 1}/{len(stages)}] {stage.name}: {status} in {seconds:.1f} s; "
               f"about {left / 60:.1f} min left")
    io.write_json(os.path.join(self.dir, "last_run.json"), self.record, **_MANIFEST_JSON)
    return self.record
