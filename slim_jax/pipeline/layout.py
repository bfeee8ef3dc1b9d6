"""Where every artifact of a run lives: the one place its paths are spelled.

  layout = RunLayout("/runs/ml-100k")
  layout.teacher_rationales   # /runs/ml-100k/rationales/teacher.jsonl

A leaf module (it imports nothing of the project), so every stage can use it.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class RunLayout:
  workdir: str

  def _at(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  # prepare
  @property
  def data(self) -> str:
    return self._at("data")

  @property
  def raw_smoke(self) -> str:  # the smoke preset's synthetic raw files
    return self._at("raw", "smoke")

  # teacher
  @property
  def rationales(self) -> str:
    return self._at("rationales")

  def rationale_file(self, source: str) -> str:
    """rationales/<source>.jsonl: 'teacher', 'student' (evaluation rationales) and
    'teacher_train', 'student_train' (training rationales, teacher/prompts.py)."""
    return self._at("rationales", f"{source}.jsonl")

  def rationale_manifest(self, source: str) -> str:
    return self._at("rationales", f"{source}_manifest.json")

  def rationale_summary(self, source: str) -> str:
    return self._at("rationales", f"{source}_summary.json")

  @property
  def teacher_rationales(self) -> str:
    return self.rationale_file("teacher")

  @property
  def teacher_manifest(self) -> str:
    return self.rationale_manifest("teacher")

  @property
  def teacher_summary(self) -> str:
    return self.rationale_summary("teacher")

  @property
  def teacher_lock(self) -> str:
    return self._at("rationales", "teacher.lock")

  # distill
  @property
  def distill(self) -> str:
    return self._at("distill")

  @property
  def adapter(self) -> str:
    return self._at("distill", "peft_adapter")

  # generate
  @property
  def student_rationales(self) -> str:
    return self.rationale_file("student")

  # encode
  @property
  def embeddings(self) -> str:
    return self._at("embeddings")

  def vectors(self, name: str) -> str:
    """embeddings/<name>.npy: 'items', 'teacher', 'student', 'student_step1', ..."""
    return self._at("embeddings", f"{name}.npy")

  def present_mask(self, name: str) -> str:
    """embeddings/<name>.present.npy [U] bool: which users have that rationale."""
    return self._at("embeddings", f"{name}.present.npy")

  def cutoffs(self, name: str) -> str:
    """embeddings/<name>.cutoff.npy [U] int32: the training items each rationale saw."""
    return self._at("embeddings", f"{name}.cutoff.npy")

  @property
  def embeddings_manifest(self) -> str:
    return self._at("embeddings", "manifest.json")

  # recommend, report
  @property
  def recommend(self) -> str:
    return self._at("recommend")

  @property
  def report(self) -> str:
    return self._at("report")

  # the runner and caches
  @property
  def pipeline(self) -> str:
    return self._at("pipeline")

  @property
  def xla_cache(self) -> str:
    return self._at("cache", "xla")
