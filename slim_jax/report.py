"""The SLIM report, from the grid results dict (format 2, slim_jax/claims.py reads it):

  results.md     the paper's table (mean ± sample std over seeds, controls and most-popular
                 included, rows that do not beat most-popular marked), the claims with
                 their bootstrap intervals and verdicts, popularity bias and cold start,
                 the rationales' quality, training curves, reading notes, stage times
  results.csv    one line per (backbone, variant): seeds, mean/std per metric, gain
  claims.csv     slim_jax/claims.py: one line per claim
  results.png    bar chart of the test metrics
  curves.png     validation NDCG@10 per epoch, mean over seeds, one panel per backbone

Rows per backbone: backbone, backbone+, SLIM-, SLIM, SLIM-shuffled; then the ID-agnostic
block on backbone 'none' and most-popular. Gain: NDCG@10 of SLIM (or the ID-agnostic row)
relative to backbone+ (for ID-agnostic: the best backbone+).
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from slim_jax import claims as claims_lib
from slim_jax import io
from slim_jax.train.metrics import sample_std

METRICS = claims_lib.METRICS
RATIONALE_FIELDS = (("records", "records"), ("parse_rate", "Step parse rate"),
                    ("restate_share", "history titles restated"),
                    ("cut_rate", "cut by the token limit"))


def summarize(per_seed: list[dict]) -> dict[str, tuple[float, float]]:
  """{metric: (mean, sample std)} over the seeds' results."""
  return {m: (float(np.mean([r[m] for r in per_seed])), sample_std([r[m] for r in per_seed]))
          for m in METRICS}


def _stat(values) -> str:
  values = [v for v in values if v is not None and not math.isnan(v)]
  return f"{np.mean(values):.4f} ± {sample_std(values):.4f}" if values else "n/a"


def _gain(stats: dict, key: claims_lib.Key) -> float | None:
  backbone, variant = key
  if variant not in ("slim", "agnostic"):
    return None
  base = [k for k in stats if k[1] == "backbone+" and (backbone == "none" or k[0] == backbone)]
  if not base:
    return None
  ref = max(stats[k]["ndcg@10"][0] for k in base)
  return (stats[key]["ndcg@10"][0] - ref) / ref if ref > 0 else None


def write(results: dict, out_dir: str, *, title: str = "SLIM results", command: str = "",
          stage_times: list[dict] | None = None, rationale_stats: dict | None = None,
          reading: list[str] | None = None) -> dict[str, str]:
  """Writes the report's files (module docstring) into out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  rows = claims_lib.rows_by_key(results)
  keys = claims_lib.order(results)
  stats = {k: summarize(rows[k]["test"]) for k in keys}
  claims = claims_lib.compute(results, rationale_stats)
  paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("md", "csv", "png")}
  paths.update(claims=os.path.join(out_dir, "claims.csv"),
               curves=os.path.join(out_dir, "curves.png"))
  _write_csv(paths["csv"], keys, rows, stats)
  claims_lib.write_csv(paths["claims"], claims)
  lines = _header(results, rows, keys, title, command)
  lines += _main_table(keys, rows, stats, rationale_stats)
  lines += _claim_lines(results, claims)
  lines += _bias_lines(results, keys, rows)
  if rationale_stats:
    lines += _rationale_lines(rationale_stats)
  lines += _curve_lines(keys, rows)
  if reading:
    lines += ["", "## Reading", ""] + [p for paragraph in reading for p in (paragraph, "")][:-1]
  if stage_times:
    lines += ["", "## Stages", "", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {t['stage']} | {t['status']} | {t['seconds']:.1f} |" for t in stage_times]
  io.write_text(paths["md"], "\n".join(lines) + "\n")
  _plot(keys, stats, paths["png"])
  _plot_curves(keys, rows, paths["curves"])
  return paths


def _write_csv(path: str, keys, rows: dict, stats: dict) -> None:
  with io.atomic_open(path) as f:
    w = csv.writer(f, lineterminator="\r\n")
    w.writerow(["backbone", "variant", "seeds"] + [f"{m}_{s}" for m in METRICS
                                                   for s in ("mean", "std")] + ["gain_ndcg@10"])
    for key in keys:
      g = _gain(stats, key)
      w.writerow([*key, len(rows[key]["test"])] + [f"{stats[key][m][k]:.6f}" for m in METRICS
                                                   for k in (0, 1)] + ["" if g is None else f"{g:.4f}"])


def _header(results: dict, rows: dict, keys, title: str, command: str) -> list[str]:
  seeds = " or ".join(str(n) for n in sorted({len(rows[k]["test"]) for k in keys}))
  lines = [f"# {title}", "",
           f"{len(results['test_users'])} test users; {len(results['cold_users'])} cold-start "
           "users (their held-out item is rare in the training data); "
           f"{len(results['teacher_users'])} users with a teacher rationale. Head items: the "
           f"most interacted-with {100 * results['head_share']:g}% of items.", "",
           f"Test metrics, mean ± sample std over {seeds} seed(s); each held-out item ranked "
           "against 100 sampled negatives. Gain: NDCG@10 of SLIM (or the ID-agnostic model) "
           "relative to backbone+ (for ID-agnostic: the best backbone+).", ""]
  if command:
    lines += ["Command:", "", f"    {command}", ""]
  return lines


def _main_table(keys, rows: dict, stats: dict, rationale_stats: dict | None) -> list[str]:
  popular = ("none", claims_lib.POPULAR)
  floor = stats[popular]["ndcg@10"][0] if popular in stats else None
  head = "| backbone | variant | seeds | NDCG@10 | HR@10 | HR@20 | gain |"
  lines = [head + (" beats most-popular |" if floor is not None else ""),
           "| --- " * (head.count("|") - 1 + (floor is not None)) + "|"]
  for key in keys:
    g = _gain(stats, key)
    line = (f"| {key[0]} | {key[1]} | {len(rows[key]['test'])} | "
            + " | ".join(f"{stats[key][m][0]:.4f} ± {stats[key][m][1]:.4f}" for m in METRICS)
            + f" | {'' if g is None else f'{100 * g:+.1f}%'} |")
    if floor is not None:
      line += " — |" if key == popular else (
          " yes |" if stats[key]["ndcg@10"][0] > floor else " **no** |")
    lines.append(line)
  if floor is not None:
    lines += ["", "beats most-popular: **no** marks a row whose mean NDCG@10 is not above "
              "the most-popular baseline's."]
  student = (rationale_stats or {}).get("student")
  has_steps = any(key[1] in claims_lib.STEPS for key in keys)
  if has_steps and student is not None and student["parse_rate"] < claims_lib.PARSE_GATE:
    lines += ["", f"The agnostic-step rows are **not meaningful**: only "
              f"{100 * student['parse_rate']:.0f}% of student rationales parse into steps "
              f"(below {100 * claims_lib.PARSE_GATE:.0f}%)."]
  return lines


def _claim_lines(results: dict, claims: list) -> list[str]:
  count = {"all": len(results["test_users"]), "cold": len(results["cold_users"]),
           "teacher": len(results["teacher_users"])}
  lines = ["", "## Claims", "",
           "Each claim compares two rows on the same users: a user's metric is averaged over "
           "a row's seeds, the difference is the mean of the per-user differences, and the "
           "95% interval is a paired bootstrap over users. A claim holds when the interval "
           "excludes 0 on its side, does not hold when it excludes 0 on the other, and is "
           "inconclusive otherwise. The second interval and verdict also resample each row's "
           "seeds, so they count the spread between trainings too; a claim that holds over "
           "users but not over seeds and users rests on the seeds that were drawn. Also in "
           "claims.csv.", ""]
  if not claims:
    return lines + ["No claim could be tested: the rows it compares were not run."]
  lines += ["| claim | backbone | users | metric | difference | 95% interval (users) | verdict "
            "| 95% interval (seeds, users) | verdict (seeds, users) | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c in claims:
    diff = "n/a" if math.isnan(c.difference) else f"{c.difference:+.4f}"
    lines.append(f"| {c.claim} | {c.backbone} | {c.users} ({count[c.users]}) | {c.metric} | "
                 f"{diff} | {_interval(c.low, c.high)} | {c.verdict} | "
                 f"{_interval(c.seeds_low, c.seeds_high)} | {c.seeds_verdict} | {c.note} |")
  return lines


def _interval(low: float, high: float) -> str:
  return "n/a" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"


def _bias_lines(results: dict, keys, rows: dict) -> list[str]:
  lines = ["", "## Popularity bias and cold start", "",
           "Head share: fraction of the top-10 (ranked over every unseen item) that are head "
           "items; vs backbone: relative to the row's backbone. Cold start: test metrics on "
           f"the {len(results['cold_users'])} cold-start users. Mean ± sample std over seeds.", "",
           "| backbone | variant | head@10 share | vs backbone | cold NDCG@10 | cold HR@10 |",
           "| --- | --- | --- | --- | --- | --- |"]

  def head_share(key):
    row = rows.get(key)
    if row is None or not all(claims_lib.HEAD in s for s in row["per_user"]):
      return None
    return claims_lib.subset_mean(results, row, claims_lib.HEAD)

  for key in keys:
    share, base = head_share(key), head_share((key[0], "backbone"))
    rel = ""
    if share is not None and base is not None and key[1] != "backbone" and base.mean() > 0:
      rel = f"{100 * (share.mean() - base.mean()) / base.mean():+.1f}%"
    cold = {m: claims_lib.subset_mean(results, rows[key], m, "cold") for m in ("ndcg@10", "hr@10")}
    lines.append(f"| {key[0]} | {key[1]} | {'n/a' if share is None else _stat(share)} | {rel} | "
                 f"{_stat(cold['ndcg@10'])} | {_stat(cold['hr@10'])} |")
  return lines


def _rationale_lines(rationale_stats: dict) -> list[str]:
  def cell(stats, field):
    value = stats.get(field)
    if value is None:
      return "n/a"
    return str(int(value)) if field == "records" else f"{100 * value:.1f}%"

  lines = ["", "## Rationales", "",
           "Step parse rate: share of rationales that split into the three steps; restated: "
           "share of history titles the rationale repeats; cut: share cut by the generation "
           f"token limit. A Step ablation (agnostic-step1/2/3) with a student parse rate "
           f"under {100 * claims_lib.PARSE_GATE:.0f}% is marked not meaningful.", "",
           "| source | " + " | ".join(name for _, name in RATIONALE_FIELDS) + " |",
           "| --- " * (len(RATIONALE_FIELDS) + 1) + "|"]
  lines += [f"| {source} | " + " | ".join(cell(stats, f) for f, _ in RATIONALE_FIELDS) + " |"
            for source, stats in rationale_stats.items()]
  return lines


def _curve_lines(keys, rows: dict) -> list[str]:
  lines = ["", "## Training curves", "",
           "Best epoch: the epoch of the best validation NDCG@10 (the checkpoint tested); "
           "mean and min–max over seeds. Validation curves in curves.png. Seconds: the "
           "cell's training wall clock, all seeds (each seed's share of the stack it was "
           "trained in, compiling and testing included).", "",
           "| backbone | variant | best epoch | best epoch min–max | epochs run | "
           "epochs run min–max | seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]
  untrained, total = [], 0.0
  for key in keys:
    best = [e for e in rows[key].get("best_epoch", []) if e is not None]
    run = [e for e in rows[key].get("epochs_run", []) if e is not None]
    if not best and not run:
      untrained.append(key[1] if key[0] == "none" else f"{key[0]}/{key[1]}")
      continue
    spread = lambda v: f"{min(v)}–{max(v)}" if v else "n/a"
    mean = lambda v: f"{np.mean(v):.1f}" if v else "n/a"
    seconds = float(sum(rows[key].get("train_seconds", [])))
    total += seconds
    lines.append(f"| {key[0]} | {key[1]} | {mean(best)} | {spread(best)} | {mean(run)} | "
                 f"{spread(run)} | {seconds:.0f} |")
  lines += ["", f"The grid's training: {total:.0f} s ({total / 60:.1f} min) in all."]
  if untrained:
    lines += ["", "Not trained (no epochs): " + ", ".join(untrained) + "."]
  return lines


def _valid_curve(row: dict, metric: str = "valid/ndcg@10") -> tuple[list[int], list[float]]:
  """(epochs, mean over the seeds that reached each epoch of `metric`)."""
  by_epoch: dict[int, list[float]] = {}
  for history in row.get("history", []):
    for h in history:
      if metric in h:
        by_epoch.setdefault(int(h["epoch"]), []).append(float(h[metric]))
  epochs = sorted(by_epoch)
  return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: str) -> None:
  with io.atomic_open(path, "wb") as f:
    fig.savefig(f, dpi=120, format="png")


def _plot(keys, stats: dict, path: str) -> None:
  plt = _pyplot()
  labels = [f"{b}\n{v}" if b != "none" else v for b, v in keys]
  x = np.arange(len(keys))
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 4))
  width = 0.27
  for k, m in enumerate(METRICS):
    ax.bar(x + (k - 1) * width, [stats[key][m][0] for key in keys], width,
           yerr=[stats[key][m][1] for key in keys], capsize=2, label=m.upper())
  ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("test metric")
  ax.legend()
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def _plot_curves(keys, rows: dict, path: str) -> None:
  plt = _pyplot()
  curves = {k: _valid_curve(rows[k]) for k in keys}
  panels = list(dict.fromkeys(k[0] for k in keys if curves[k][0]))
  fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.5),
                           squeeze=False)
  for ax, backbone in zip(axes[0], panels):
    for key in keys:
      if key[0] == backbone and curves[key][0]:
        ax.plot(*curves[key], marker=".", label=key[1])
    ax.set_title(backbone)
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid NDCG@10 (mean over seeds)")
    ax.legend(fontsize=7)
  if not panels:
    axes[0][0].text(0.5, 0.5, "no training history", ha="center", va="center")
    axes[0][0].set_axis_off()
  fig.tight_layout()
  _save(fig, path)
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
