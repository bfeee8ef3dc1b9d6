"""slim_jax/report.py: the paper-layout table, the gain, the analyses table, the files."""

import csv

import pytest

from slim_jax import report


def _seeds(ndcg: list[float]) -> list[dict]:
  return [{"ndcg@10": v, "hr@10": min(1.0, 2 * v), "hr@20": min(1.0, 3 * v)} for v in ndcg]


def _analysis(share: float, cold: float) -> dict:
  return {"head_share@10": share, "cold": {"users": 7, "ndcg@10": cold, "hr@10": 2 * cold,
                                           "hr@20": 3 * cold}}


def test_tables_gain_and_analyses(tmp_path):
  results = {("sasrec", "backbone"): _seeds([0.20, 0.22]),
             ("sasrec", "backbone+"): _seeds([0.25, 0.25]),
             ("sasrec", "slim"): _seeds([0.30, 0.30]),
             ("none", "agnostic"): _seeds([0.10, 0.12])}
  analyses = {("sasrec", "backbone"): [_analysis(0.5, 0.1)] * 2,
              ("sasrec", "backbone+"): [_analysis(0.4, 0.2)] * 2,
              ("sasrec", "slim"): [_analysis(0.25, 0.3)] * 2,
              ("none", "agnostic"): [_analysis(0.2, 0.15)] * 2}
  paths = report.write(results, str(tmp_path), title="t", command="run it",
                       stage_times=[{"stage": "prepare", "status": "done", "seconds": 1.0}],
                       analyses=analyses)
  with open(paths["csv"]) as f:
    rows = {(r["backbone"], r["variant"]): r for r in csv.DictReader(f)}
  assert list(rows) == [("sasrec", "backbone"), ("sasrec", "backbone+"), ("sasrec", "slim"),
                        ("none", "agnostic")]  # the paper's order
  assert float(rows[("sasrec", "backbone")]["ndcg@10_mean"]) == pytest.approx(0.21)
  assert float(rows[("sasrec", "backbone")]["ndcg@10_std"]) == pytest.approx(0.01)
  assert float(rows[("sasrec", "slim")]["gain_ndcg@10"]) == pytest.approx(0.2)  # 0.30 / 0.25
  assert float(rows[("none", "agnostic")]["gain_ndcg@10"]) == pytest.approx(0.11 / 0.25 - 1)
  assert rows[("sasrec", "backbone")]["gain_ndcg@10"] == ""
  md = open(paths["md"]).read()
  assert "| sasrec | slim | 0.3000 ± 0.0000" in md and "+20.0%" in md
  assert "## Popularity bias and cold start" in md
  assert "| sasrec | slim | 0.2500 ± 0.0000 | -50.0% | 0.3000 ± 0.0000 |" in md
  assert "run it" in md and "| prepare | done | 1.0 |" in md
  assert (tmp_path / "results.png").stat().st_size > 1000


def test_interpretability_page(tmp_path):
  path = tmp_path / "i.md"
  report.interpretability_page(str(path), [{
      "user": "u1", "model": "sasrec/slim", "history": ["A", "B"], "rationale": "likes A\nB",
      "top10": ["C", "D"], "held_out": "C", "hit": True}])
  text = path.read_text()
  assert "## User u1 (sasrec/slim)" in text and "> likes A\n> B" in text
  assert "Held-out item: C (in the top-10)" in text
