"""The SLIM report: results.md / results.csv in the paper's layout, a bar chart, and an
interpretability page.

`results` maps (backbone, variant) to a list of per-seed test metric dicts (slim_jax/train/
loop.py's `test`). Rows per backbone: backbone, backbone+, SLIM-, SLIM; then the
ID-agnostic block (variant names from slim_jax/recommenders/slim.py, backbone 'none').
Columns: NDCG@10, HR@10, HR@20 as mean ± std over seeds, and the relative gain of SLIM
(or the ID-agnostic row) over backbone+ on NDCG@10.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from slim_jax import io

METRICS = ("ndcg@10", "hr@10", "hr@20")
ID_ROWS = ("backbone", "backbone+", "slim-", "slim")
AGNOSTIC_ROWS = ("agnostic", "agnostic-step1", "agnostic-step2", "agnostic-step3")


def summarize(per_seed: list[dict]) -> dict[str, tuple[float, float]]:
  return {m: (float(np.mean([r[m] for r in per_seed])), float(np.std([r[m] for r in per_seed])))
          for m in METRICS}


def _rows(results: dict) -> list[tuple[str, str, dict]]:
  backbones = sorted({b for b, _ in results if b != "none"})
  rows = [(b, v, summarize(results[(b, v)])) for b in backbones for v in ID_ROWS
          if (b, v) in results]
  rows += [("none", v, summarize(results[("none", v)])) for v in AGNOSTIC_ROWS
           if ("none", v) in results]
  return rows


def _gain(results: dict, backbone: str, variant: str) -> float | None:
  base = [(b, "backbone+") for b in ([backbone] if backbone != "none" else
                                     sorted({b for b, _ in results if b != "none"}))]
  base = [k for k in base if k in results]
  if variant not in ("slim", "agnostic") or not base:
    return None
  ref = max(summarize(results[k])["ndcg@10"][0] for k in base)
  ours = summarize(results[(backbone, variant)])["ndcg@10"][0]
  return (ours - ref) / ref if ref > 0 else None


def write(results: dict, out_dir: str, *, title: str = "SLIM results",
          command: str = "", stage_times: list[dict] | None = None,
          analyses: dict | None = None) -> dict[str, str]:
  """Writes results.md, results.csv and results.png; returns their paths.

  `analyses` maps (backbone, variant) to per-seed slim_jax/analysis.py summaries: they add
  the popularity-bias and cold-start table to results.md.
  """
  os.makedirs(out_dir, exist_ok=True)
  rows = _rows(results)
  seeds = sorted({len(v) for v in results.values()})
  paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("md", "csv", "png")}
  with io.atomic_open(paths["csv"]) as f:
    w = csv.writer(f, lineterminator="\r\n")
    w.writerow(["backbone", "variant", "seeds"] + [f"{m}_{s}" for m in METRICS
                                                   for s in ("mean", "std")] + ["gain_ndcg@10"])
    for b, v, s in rows:
      g = _gain(results, b, v)
      w.writerow([b, v, len(results[(b, v)])] + [f"{s[m][k]:.6f}" for m in METRICS
                                                 for k in (0, 1)] + ["" if g is None else f"{g:.4f}"])
  counts = " or ".join(str(n) for n in seeds)  # rows with unequal seed counts list each
  lines = [f"# {title}", "", f"Test metrics, mean ± std over {counts} seed(s); each held-out "
           "item ranked against 100 sampled negatives. Gain: NDCG@10 of SLIM (or the "
           "ID-agnostic model) relative to backbone+ (for ID-agnostic: the best backbone+).", ""]
  if command:
    lines += ["Command:", "", f"    {command}", ""]
  lines += ["| backbone | variant | NDCG@10 | HR@10 | HR@20 | gain |",
            "| --- | --- | --- | --- | --- | --- |"]
  for b, v, s in rows:
    g = _gain(results, b, v)
    lines.append(f"| {b} | {v} | " + " | ".join(f"{s[m][0]:.4f} ± {s[m][1]:.4f}" for m in METRICS)
                 + f" | {'' if g is None else f'{100 * g:+.1f}%'} |")
  if analyses:
    lines += analysis_lines(rows, analyses)
  if stage_times:
    lines += ["", "## Stages", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {t['stage']} | {t['status']} | {t['seconds']:.1f} |" for t in stage_times]
  io.write_text(paths["md"], "\n".join(lines) + "\n")
  _plot(rows, paths["png"])
  return paths


def analysis_lines(rows, analyses: dict) -> list[str]:
  """Markdown: head-item share of the top-10 (popularity bias) and cold-start metrics."""
  def stat(values):
    values = [v for v in values if v is not None]  # None: no cold users
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if values else "n/a"
  first = next(iter(analyses.values()))[0]
  share_key = next(k for k in first if k.startswith("head_share"))
  lines = ["", "## Popularity bias and cold start", "",
           f"Head share: fraction of the top-10 (ranked over every unseen item) that are head "
           f"items, the most interacted-with items in training; against the row's backbone "
           f"(relative). Cold start: test metrics on the {first['cold']['users']} users whose "
           "held-out item has few training interactions.", "",
           "| backbone | variant | head share | vs backbone | cold NDCG@10 | cold HR@10 |",
           "| --- | --- | --- | --- | --- | --- |"]
  for b, v, _ in rows:
    if (b, v) not in analyses:
      continue
    runs = analyses[(b, v)]
    share = float(np.mean([r[share_key] for r in runs]))
    base = analyses.get((b, "backbone"))
    rel = ""
    if base and v != "backbone":
      ref = float(np.mean([r[share_key] for r in base]))
      rel = f"{100 * (share - ref) / ref:+.1f}%" if ref > 0 else ""
    lines.append(f"| {b} | {v} | {stat([r[share_key] for r in runs])} | {rel} | "
                 f"{stat([r['cold']['ndcg@10'] for r in runs])} | "
                 f"{stat([r['cold']['hr@10'] for r in runs])} |")
  return lines


def _plot(rows, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  labels = [f"{b}\n{v}" if b != "none" else v for b, v, _ in rows]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
  width = 0.27
  for k, m in enumerate(METRICS):
    ax.bar(x + (k - 1) * width, [s[m][0] for _, _, s in rows], width,
           yerr=[s[m][1] for _, _, s in rows], capsize=2, label=m.upper())
  ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("test metric")
  ax.legend()
  fig.tight_layout()
  with io.atomic_open(path, "wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def interpretability_page(path: str, cases: list[dict]) -> None:
  """cases: dicts with user, history (titles), rationale, top10 (titles), held_out (title),
  hit (bool). Writes a markdown page."""
  lines = ["# Interpretability: rationale beside the recommendation", ""]
  for c in cases:
    lines += [f"## User {c['user']} ({c.get('model', '')})", "", "History (oldest first): " + "; ".join(c["history"]),
              "", "Student rationale:", "", "> " + c["rationale"].replace("\n", "\n> "), "",
              "Top-10: " + "; ".join(c["top10"]), "",
              f"Held-out item: {c['held_out']} ({'in' if c['hit'] else 'not in'} the top-10)", ""]
  io.write_text(path, "\n".join(lines))
