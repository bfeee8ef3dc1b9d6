"""Where every artifact of a run lives: the one place its paths are spelled.

  layout = RunLayout("/runs/ml-100k")
  layout.teacher_rationales   # /runs/ml-100k/rationales/teacher.jsonl
  layout.recommend(0.5)       # /runs/ml-100k/recommend_train0.5 (the sparsity analysis)

A leaf module (it imports nothing of the project), so every stage can use it.
"""

from __future__ import annotations

import dataclasses
import os


def fraction_suffix(train_fraction: float) -> str:
  """'' for the full training data, '_train0.5' for the sparsity analysis at half."""
  return "" if train_fraction == 1.0 else f"_train{train_fraction:g}"


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
    """rationales/<source>.jsonl for source 'teacher' or 'student'."""
    return self._at("rationales", f"{source}.jsonl")

  @property
  def teacher_rationales(self) -> str:
    return self.rationale_file("teacher")

  @property
  def teacher_manifest(self) -> str:
    return self._at("rationales", "teacher_manifest.json")

  @property
  def teacher_summary(self) -> str:
    return self._at("rationales", "teacher_summary.json")

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

  @property
  def embeddings_manifest(self) -> str:
    return self._at("embeddings", "manifest.json")

  # recommend, report
  def recommend(self, train_fraction: float = 1.0) -> str:
    return self._at("recommend" + fraction_suffix(train_fraction))

  def report(self, train_fraction: float = 1.0) -> str:
    return self._at("report" + fraction_suffix(train_fraction))

  # the runner and caches
  @property
  def pipeline(self) -> str:
    return self._at("pipeline")

  @property
  def xla_cache(self) -> str:
    return self._at("cache", "xla")
