"""slim_jax/report.py: the files, the paper table, the claims, the rationales, the curves."""

import csv

import numpy as np
import pytest
from test_claims import COLD, TEACHER, USERS, grid_results

from slim_jax import claims, report

PNG = b"\x89PNG\r\n\x1a\n"
TITLE = "SLIM on a planted grid"
COMMAND = "python experiments/run_slim.py --preset tiny"
READING = ["First paragraph of the reading.", "Second paragraph, after a blank line."]
STAGES = [{"stage": "prepare", "status": "done", "seconds": 1.5},
          {"stage": "recommend", "status": "done", "seconds": 30.25}]
RATIONALE_STATS = {  # the student's steps mostly do not parse: the Step rows are gated
    "teacher": {"records": 200, "parse_rate": 0.95, "restate_share": 0.1, "cut_rate": 0.0},
    "student": {"records": 120, "parse_rate": 0.5, "restate_share": 0.25, "cut_rate": 0.02}}
BELOW_POPULAR = {("none", "agnostic-step1"), ("none", "agnostic-step2")}  # planted below it


@pytest.fixture(scope="module")
def results():
  return grid_results()


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
  out = tmp_path_factory.mktemp("report")
  return report.write(results, str(out), title=TITLE, command=COMMAND, stage_times=STAGES,
                      rationale_stats=RATIONALE_STATS, reading=READING)


@pytest.fixture(scope="module")
def md(written):
  with open(written["md"], encoding="utf-8") as f:
    return f.read()


def line_of(md: str, start: str) -> str:
  [line] = [l for l in md.splitlines() if l.startswith(start)]
  return line


def mean_ndcg(results, key):
  return np.mean([s["ndcg@10"] for s in claims.rows_by_key(results)[key]["test"]])


def test_writes_five_files(written):
  names = {k: p.rsplit("/", 1)[-1] for k, p in written.items()}
  assert names == {"md": "results.md", "csv": "results.csv", "png": "results.png",
                   "claims": "claims.csv", "curves": "curves.png"}
  for key in ("png", "curves"):
    with open(written[key], "rb") as f:
      assert f.read(8) == PNG


def test_header_command_reading_and_stages(md):
  assert md.startswith(f"# {TITLE}\n")
  assert f"{USERS} test users; {COLD} cold-start users" in md
  assert f"{TEACHER} users with a teacher rationale" in md and "20% of items" in md
  assert "mean ± sample std over 3 seed(s)" in md
  assert f"\n    {COMMAND}\n" in md
  assert f"## Reading\n\n{READING[0]}\n\n{READING[1]}\n" in md
  assert "| prepare | done | 1.5 |" in md and "| recommend | done | 30.2 |" in md


def test_main_table_rows_and_most_popular_mark(results, md):
  popular = mean_ndcg(results, ("none", "most-popular"))
  for key in claims.order(results):
    row = claims.rows_by_key(results)[key]
    ndcg = [s["ndcg@10"] for s in row["test"]]
    mean, std = np.mean(ndcg), np.std(ndcg, ddof=1)
    line = line_of(md, f"| {key[0]} | {key[1]} | 3 | ")
    assert f"| 3 | {mean:.4f} ± {std:.4f} |" in line
    mark = "—" if key[1] == "most-popular" else "**no**" if key in BELOW_POPULAR else "yes"
    assert line.endswith(f" {mark} |"), line
    assert (mean_ndcg(results, key) > popular) == (mark == "yes") or mark == "—"
  assert "beats most-popular: **no** marks a row" in md


def test_gain_against_backbone_plus(results, md):
  plus = mean_ndcg(results, ("sasrec", "backbone+"))
  gain = mean_ndcg(results, ("sasrec", "slim")) / plus - 1
  assert gain > 0.1
  assert f"| {100 * gain:+.1f}% |" in line_of(md, "| sasrec | slim | 3 |")
  assert line_of(md, "| sasrec | backbone | 3 |").endswith(" |  | yes |")  # no gain


def test_claims_section(results, md):
  assert "## Claims" in md
  found = claims.compute(results, RATIONALE_STATS)
  assert {c.verdict for c in found} == {"holds", "does not hold", "inconclusive",
                                        "not meaningful"}
  for c in found:
    line = line_of(md, f"| {c.claim} | {c.backbone} | {c.users} (")
    assert (f"| {c.difference:+.4f} | [{c.low:+.4f}, {c.high:+.4f}] | {c.verdict} | "
            f"[{c.seeds_low:+.4f}, {c.seeds_high:+.4f}] | {c.seeds_verdict} |") in line


def test_step_rows_flagged_not_meaningful(md):
  assert "The agnostic-step rows are **not meaningful**: only 50% of student rationales" in md


def test_no_step_note_without_step_rows(results, tmp_path):
  without = {**results, "rows": [r for r in results["rows"]
                                 if r["variant"] not in claims.STEPS]}
  paths = report.write(without, str(tmp_path), rationale_stats=RATIONALE_STATS)
  with open(paths["md"], encoding="utf-8") as f:
    assert "agnostic-step rows" not in f.read()


def test_rationale_lines(md):
  assert "## Rationales" in md
  assert "| teacher | 200 | 95.0% | 10.0% | 0.0% |" in md
  assert "| student | 120 | 50.0% | 25.0% | 2.0% |" in md


def test_popularity_and_curves(md):
  assert "## Popularity bias and cold start" in md
  slim = line_of(md, "| sasrec | slim | 0.4000 ± ")  # head@10 0.4 against backbone's 0.6
  assert "| -33.3% |" in slim
  assert "| sasrec | slim | 3.0 | 2–4 | 6.0 | 5–7 | 60 |" in md  # 10 + 20 + 30 seconds
  trained = sum(1 for line in md.splitlines() if line.endswith(" | 60 |"))
  assert f"The grid's training: {60 * trained} s" in md
  assert "Not trained (no epochs): most-popular." in md


def test_results_csv(results, written):
  with open(written["csv"], newline="", encoding="utf-8") as f:
    lines = list(csv.DictReader(f))
  assert [(r["backbone"], r["variant"]) for r in lines] == claims.order(results)
  rows = claims.rows_by_key(results)
  for line in lines:
    test = rows[(line["backbone"], line["variant"])]["test"]
    assert int(line["seeds"]) == len(test) == 3
    for m in claims.METRICS:
      values = [s[m] for s in test]
      assert float(line[f"{m}_mean"]) == pytest.approx(np.mean(values), abs=1e-6)
      assert float(line[f"{m}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-6)
  gains = {(r["backbone"], r["variant"]): r["gain_ndcg@10"] for r in lines}
  plus = mean_ndcg(results, ("sasrec", "backbone+"))
  assert float(gains[("sasrec", "slim")]) == pytest.approx(
      mean_ndcg(results, ("sasrec", "slim")) / plus - 1, abs=1e-4)
  assert float(gains[("none", "agnostic")]) == pytest.approx(
      mean_ndcg(results, ("none", "agnostic")) / plus - 1, abs=1e-4)
  assert {k for k, g in gains.items() if g} == {("sasrec", "slim"), ("none", "agnostic")}


def test_claims_csv_is_compute(results, written, tmp_path):
  expected = tmp_path / "expected.csv"
  claims.write_csv(str(expected), claims.compute(results, RATIONALE_STATS))
  with open(written["claims"], "rb") as f:
    text = f.read()
  assert text == expected.read_bytes()
  assert b"not meaningful" in text  # report.write passed rationale_stats on


def test_without_most_popular_or_rationale_stats(results, tmp_path):
  rows = [r for r in results["rows"] if r["variant"] != "most-popular"]
  paths = report.write({**results, "rows": rows}, str(tmp_path), title="t")
  with open(paths["md"], encoding="utf-8") as f:
    md = f.read()
  assert "beats most-popular" not in md and "## Rationales" not in md
  assert "not meaningful" not in md and "Not trained" not in md
  assert "Command:" not in md and "## Reading" not in md and "## Stages" not in md
  assert line_of(md, "| sasrec | slim | 3 | ").endswith("% |")  # ends at the gain column


def test_interpretability_page(tmp_path):
  path = tmp_path / "i.md"
  report.interpretability_page(str(path), [
      {"user": "u1", "model": "sasrec/slim", "history": ["A", "B"], "rationale": "likes A\nB",
       "top10": ["C", "D"], "held_out": "C", "hit": True},
      {"user": "u2", "model": "agnostic", "history": ["E"], "rationale": "likes E",
       "top10": ["F"], "held_out": "G", "hit": False}])
  text = path.read_text()
  assert "## User u1 (sasrec/slim)" in text and "> likes A\n> B" in text
  assert "History (oldest first): A; B" in text and "Top-10: C; D" in text
  assert "Held-out item: C (in the top-10)" in text
  assert "## User u2 (agnostic)" in text and "Held-out item: G (not in the top-10)" in text
