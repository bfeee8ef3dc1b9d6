"""How good a source's rationales are as reasoning, for the report.

  source_stats(records, dataset) -> {"records", "parse_rate", "restate_share", "cut_rate"}
  rationale_stats(layout, dataset) -> {source: source_stats} for every rationale file there

parse_rate     share of rationales that parse into steps at explicit "Step N" markers
               (prompts.parse_steps); a Step ablation on a source under 80% is not
               meaningful (slim_jax/claims.py)
restate_share  share of the history titles shown in the prompt that the answer quotes
               (case-insensitive): near 1, the "rationale" mostly restates the history
cut_rate       share of generations stopped by the token limit (finish_reason "length")
"""

from __future__ import annotations

import os

from slim_jax.data.dataset import SequenceDataset
from slim_jax.pipeline.layout import RunLayout
from slim_jax.teacher import prompts, rationales

SOURCE_BASES = ("teacher", "student")


def _shown_titles(record: dict, dataset: SequenceDataset) -> list[str]:
  """Titles of the user's training items that the record's prompt shows."""
  prompt = "\n".join(m["content"] for m in record["messages"]).lower()
  prefix = dataset.train_prefix(record["user_id"])[:record.get("cutoff")]
  titles = {dataset.item(int(i)).title.strip().lower() for i in prefix}
  return [t for t in titles if t and t in prompt]


def source_stats(records: list[dict], dataset: SequenceDataset) -> dict:
  """The module's three rates over `records` (NaN-free: 0 records give zeros)."""
  n = len(records)
  parsed = sum(prompts.parse_steps(r["response"]) is not None for r in records)
  cut = sum(r.get("finish_reason") == "length" for r in records)
  shown = quoted = 0
  for r in records:
    titles = _shown_titles(r, dataset)
    answer = r["response"].lower()
    shown += len(titles)
    quoted += sum(t in answer for t in titles)
  return {"records": n, "parse_rate": parsed / n if n else 0.0,
          "restate_share": quoted / shown if shown else 0.0,
          "cut_rate": cut / n if n else 0.0}


def rationale_stats(layout: RunLayout, dataset: SequenceDataset) -> dict[str, dict]:
  """{source: source_stats} for each of teacher, teacher_train, student, student_train
  whose file exists."""
  out = {}
  for base in SOURCE_BASES:
    for kind in prompts.KINDS:
      source = prompts.source_name(base, kind)
      path = layout.rationale_file(source)
      if os.path.exists(path):
        out[source] = source_stats(rationales.read(path), dataset)
  return out
