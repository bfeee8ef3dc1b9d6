"""The stage runner of experiments/run_slim.py: skip a stage whose outputs match its inputs.

A `Stage` names its input paths, its parameters (anything that changes its result), its
output paths and a `run` callable. Before running, `Pipeline.run` hashes the inputs (file
contents; a folder is hashed file by file, in sorted order) and compares them, with the
parameters, against `<workdir>/pipeline/<stage>.json`, written after the stage finished.
When every output exists and the manifest matches, the stage is skipped; otherwise it runs
(stages themselves resume from partial outputs) and the manifest is rewritten atomically.
A progress line per stage reports the time taken and an estimate of the time left, from
each stage's expected seconds scaled by how fast the finished stages went.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

MANIFEST_DIR = "pipeline"


@dataclasses.dataclass
class Stage:
  name: str
  run: Callable[[], Any]
  inputs: Sequence[str] = ()
  outputs: Sequence[str] = ()
  params: dict = dataclasses.field(default_factory=dict)
  expected_seconds: float = 60.0


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
                for n in sorted(names) if ".tmp" not in n]
  for rel, full in files:
    digest.update(rel.encode() + b"\0")
    with open(full, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def _write_json(path: str, value) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


class Pipeline:
  """Runs stages in order; records per stage whether it ran or was skipped, and its time."""

  def __init__(self, workdir: str, log: Callable[[str], None] = print):
    self.workdir, self.log = workdir, log
    self.dir = os.path.join(workdir, MANIFEST_DIR)
    os.makedirs(self.dir, exist_ok=True)
    self.record: list[dict] = []

  def _wanted(self, stage: Stage) -> dict:
    return {"inputs": {p: hash_path(p) for p in stage.inputs},
            "params": json.loads(json.dumps(stage.params, sort_keys=True, default=str))}

  def up_to_date(self, stage: Stage) -> bool:
    path = os.path.join(self.dir, f"{stage.name}.json")
    if not os.path.exists(path) or not all(os.path.exists(p) for p in stage.outputs):
      return False
    with open(path, encoding="utf-8") as f:
      try:
        stored = json.load(f)
      except json.JSONDecodeError:
        return False
    return {k: stored.get(k) for k in ("inputs", "params")} == self._wanted(stage)

  def run(self, stages: Sequence[Stage]) -> list[dict]:
    expected = [s.expected_seconds for s in stages]
    spent_actual = spent_expected = 0.0
    for i, stage in enumerate(stages):
      start = time.perf_counter()
      if self.up_to_date(stage):
        status = "skipped"
      else:
        stage.run()
        missing = [p for p in stage.outputs if not os.path.exists(p)]
        if missing:
          raise RuntimeError(f"stage {stage.name} finished without writing {missing}")
        _write_json(os.path.join(self.dir, f"{stage.name}.json"),
                    {**self._wanted(stage), "finished": time.time(),
                     "seconds": time.perf_counter() - start})
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
    _write_json(os.path.join(self.dir, "last_run.json"), self.record)
    return self.record
