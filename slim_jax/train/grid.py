"""The recommend stage of a SLIM run: every (backbone, variant, seed), with the analyses.

  results, analyses = train_grid(workdir, spec)

For each variant (slim_jax/recommenders/slim.py) on each backbone (ID-agnostic variants
once, backbone 'none') and each seed, trains with slim_jax/train/loop.py and writes
`<recommend_dir>/<backbone>/<variant>/seed_<s>/result.json` atomically. Each result records
the fingerprint it was trained under (the pipeline stage's, else `default_fingerprint`: the
spec, the prepared data and the embeddings); a seed whose result carries the current
fingerprint is never retrained, one made under another is deleted, checkpoints included,
and trained again. Each result also holds the analyses of slim_jax/analysis.py on
the best checkpoint (share of head items in the top-10, metrics of the cold-start users).
`spec.train_fraction < 1` thins every training prefix first (the sparsity analysis) and
keeps its results in its own folder. The text vectors come from `<workdir>/embeddings/`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import time
from collections.abc import Callable

import numpy as np

from slim_jax import analysis
from slim_jax import io
from slim_jax.data import dataset as dataset_lib
from slim_jax.data import prepare, sequences
from slim_jax.pipeline import layout as layout_lib
from slim_jax.recommenders import slim
from slim_jax.train import loop
from slim_jax.train.checkpoints import Checkpointer

RESULTS_FILE = "results.json"


@dataclasses.dataclass(frozen=True)
class GridSpec:
  backbones: tuple[str, ...]
  variants: tuple[str, ...]
  seeds: tuple[int, ...]
  epochs: int
  patience: int
  hidden: int
  batch: int
  max_len: int
  train_fraction: float = 1.0  # < 1: the sparsity analysis
  head_share: float = 0.2  # the most popular share of items that counts as "head"
  cold_max_count: int = 5  # a cold-start user's test item has at most this many interactions

  def __post_init__(self):
    if not 0.0 < self.train_fraction <= 1.0:
      raise ValueError(f"--train_fraction={self.train_fraction} must be in (0, 1]")
    if not 0.0 < self.head_share < 1.0:
      raise ValueError(f"--head_share={self.head_share} must be in (0, 1)")
    if self.cold_max_count < 0:
      raise ValueError(f"--cold_max_count={self.cold_max_count} must be >= 0")

  @property
  def suffix(self) -> str:
    return layout_lib.fraction_suffix(self.train_fraction)


def recommend_dir(workdir: str, spec: GridSpec) -> str:
  return layout_lib.RunLayout(workdir).recommend(spec.train_fraction)


def text_vectors(workdir: str, name: str) -> np.ndarray:
  return np.load(layout_lib.RunLayout(workdir).vectors(name))


def load_data(workdir: str, spec: GridSpec) -> dataset_lib.SequenceDataset:
  data = dataset_lib.load(prepare.prepared_dir(workdir))
  return analysis.thin_training(data, spec.train_fraction) if spec.train_fraction < 1 else data


def make_model(workdir: str, spec: GridSpec, data, backbone: str, variant: str):
  source = slim.variant_source(variant)
  return slim.make_model(variant, "sasrec" if backbone == "none" else backbone,
                         num_items=data.num_items, item_text=text_vectors(workdir, "items"),
                         user_text=text_vectors(workdir, source) if source else None,
                         max_len=spec.max_len, hidden_size=spec.hidden)


def restore_best(run_dir: str):
  with Checkpointer(os.path.join(run_dir, "checkpoints"), best_metric="valid/ndcg@10") as ckpt:
    params, _ = ckpt.restore(None, step="best")
  return params


def cells(spec: GridSpec) -> list[tuple[str, str]]:
  """(backbone, variant) pairs in report order; ID-agnostic variants on backbone 'none'."""
  out = []
  for variant in spec.variants:
    out += [("none", variant)] if slim.is_id_agnostic(variant) else [
        (b, variant) for b in spec.backbones]
  return out



def default_fingerprint(workdir: str, spec: GridSpec) -> str:
  """What a seed's result depends on: the spec, the prepared data, the embeddings."""
  layout = layout_lib.RunLayout(workdir)
  vectors = sorted(glob.glob(layout.vectors("*")))  # not the folder: it holds an XLA cache
  inputs = {os.path.relpath(path, workdir): io.hash_path(path)
            for path in [layout.data, layout.embeddings_manifest, *vectors]}
  return io.fingerprint({"spec": dataclasses.asdict(spec), "inputs": inputs})


def _reusable_result(run_dir: str, fingerprint: str) -> dict | None:
  """The seed's result if it was made under `fingerprint`; else its folder is removed."""
  done = os.path.join(run_dir, "result.json")
  if os.path.exists(done):
    try:
      result = io.read_json(done, "seed result")
    except ValueError:
      result = None
    if isinstance(result, dict) and result.get("fingerprint") == fingerprint:
      return result
  if os.path.exists(run_dir):
    shutil.rmtree(run_dir)  # stale or partial work of another fingerprint: never resumed
  return None


def train_grid(workdir: str, spec: GridSpec, log: Callable[[str], None] = print,
               fingerprint: str | None = None) -> tuple[dict, dict]:
  """Per (backbone, variant): the per-seed test metrics and the per-seed analyses."""
  fingerprint = fingerprint or default_fingerprint(workdir, spec)
  data = load_data(workdir, spec)
  negatives = sequences.load_negatives(prepare.prepared_dir(workdir))
  test = sequences.eval_set(data, "test", negatives, spec.max_len)
  counts = analysis.training_counts(data)
  head = analysis.head_items(counts, spec.head_share)
  cold = analysis.cold_users(data, counts, spec.cold_max_count)
  results, analyses = {}, {}
  for backbone, variant in cells(spec):
    model = make_model(workdir, spec, data, backbone, variant)
    per_seed, per_seed_analysis = [], []
    for seed in spec.seeds:
      run_dir = os.path.join(recommend_dir(workdir, spec), backbone, variant, f"seed_{seed}")
      done = os.path.join(run_dir, "result.json")
      result = _reusable_result(run_dir, fingerprint)
      if result is None:
        config = loop.TrainConfig(loss="bce", epochs=spec.epochs, batch_size=spec.batch,
                                  patience=spec.patience, eval_batch_size=spec.batch,
                                  max_len=spec.max_len, seed=seed, progress=False)
        start = time.perf_counter()
        result = loop.train_and_evaluate(model, data, negatives, config, run_dir,
                                         name=f"{backbone}/{variant}/{seed}", log=lambda _: None)
        result["wall_seconds"] = time.perf_counter() - start
        result["fingerprint"] = fingerprint
        log(f"  {backbone}/{variant}/seed {seed}: test " + "  ".join(
            f"{k} {v:.4f}" for k, v in result["test"].items())
            + f"  ({result['wall_seconds']:.0f} s)")
      if "analysis" not in result:
        per_user = analysis.user_analysis(model, restore_best(run_dir), test, data.num_items,
                                          batch_size=spec.batch)
        result["analysis"] = analysis.summarize(per_user, head, cold)
        # the result and its analysis land together
        io.write_json(done, result, indent=1, default=float)
      per_seed.append(result["test"])
      per_seed_analysis.append(result["analysis"])
    results[(backbone, variant)] = per_seed
    analyses[(backbone, variant)] = per_seed_analysis
  io.write_json(os.path.join(recommend_dir(workdir, spec), RESULTS_FILE), [
      {"backbone": b, "variant": v, "test": results[(b, v)], "analysis": analyses[(b, v)]}
      for b, v in results], indent=1, default=float)
  return results, analyses


def read_results(workdir: str, spec: GridSpec) -> tuple[dict, dict]:
  """(results, analyses) as `train_grid` returns them, from the recommend stage's
  results.json, so the report needs no training code."""
  rows = io.read_json(os.path.join(recommend_dir(workdir, spec), RESULTS_FILE), "grid results")
  return ({(r["backbone"], r["variant"]): r["test"] for r in rows},
          {(r["backbone"], r["variant"]): r["analysis"] for r in rows})


def interpretability_cases(workdir: str, spec: GridSpec, student: dict,
                           num_users: int = 3) -> list[dict]:
  """History, student rationale, top-10 (unseen items) of the first SLIM or ID-agnostic
  model, and the held-out item, for the first `num_users` users."""
  variant = next((v for v in ("slim", "agnostic") if v in spec.variants), None)
  if variant is None:
    return []
  backbone = "none" if slim.is_id_agnostic(variant) else spec.backbones[0]
  data = load_data(workdir, spec)
  test = sequences.eval_set(data, "test", sequences.load_negatives(
      prepare.prepared_dir(workdir)), spec.max_len)
  users = np.arange(min(num_users, data.num_users))
  subset = sequences.EvalSet(users=test.users[users], inputs=test.inputs[users],
                             candidates=test.candidates[users],
                             seen=[test.seen[u] for u in users])
  run_dir = os.path.join(recommend_dir(workdir, spec), backbone, variant,
                         f"seed_{spec.seeds[0]}")
  model = make_model(workdir, spec, data, backbone, variant)
  top = analysis.user_analysis(model, restore_best(run_dir), subset, data.num_items,
                               batch_size=len(users))["top"]
  title = lambda i: data.item(int(i)).title  # noqa: E731
  cases = []
  for row, u in enumerate(users):
    held = int(test.targets[u])
    cases.append({"user": data.user_raw_ids[u], "model": f"{backbone}/{variant}",
                  "history": [title(i) for i in test.inputs[u] if i > 0],
                  "rationale": student.get(int(u), {}).get("response", "(none)"),
                  "top10": [title(i) for i in top[row]], "held_out": title(held),
                  "hit": held in top[row].tolist()})
  return cases
