"""The recommend stage of a SLIM run: every (backbone, variant, seed), with the analyses.

  results = train_grid(workdir, spec)     the results dict, format 2 (slim_jax/claims.py)

For each variant (slim_jax/recommenders/slim.py) on each backbone (ID-agnostic variants
once, backbone 'none'), trains the seeds not yet done together (slim_jax/train/
seed_stack.py: one program steps every seed, each as slim_jax/train/loop.py would alone)
and writes `<recommend_dir>/<backbone>/<variant>/seed_<s>/result.json` atomically. Each
result records the fingerprint it was trained under (`default_fingerprint`: the spec's
training settings, `TRAINING_VERSION` and the cell's model's `MODEL_VERSIONS` entry, the
prepared data and the embeddings); a seed whose
result carries the current fingerprint is never retrained, one made under another is
deleted, checkpoints included, and trained again. Cells and seeds outside the spec are left
as they are, so a grid can be trained in pieces on one workdir and reported whole. Each
result also keeps, from the best checkpoint, every test user's
metrics (`per_user`: NDCG@10, HR@10, HR@20 on the stored candidates, and head@10, the share
of head items in the user's top-10 over every unseen item), the train loss and validation
metrics per epoch and the best epoch. A most-popular row (training counts, ties broken at
random per seed) is always added. In a sparsity run (prepared with a train_fraction,
slim_jax/data/sparsity.py) head items and cold-start users come from the full data's
training counts, so every fraction is judged on the same ones.

results.json = {"format": 2, "test_users": [U], "cold_users": [...], "teacher_users": [...]
(users with a teacher rationale), "head_share", "rows": [{"backbone", "variant", "seeds",
"test": [{metric: mean}], "per_user": [{metric: [U]}], "best_epoch", "epochs_run",
"history", "train_seconds" (each seed's share of its stack's wall clock)}]}. The text
vectors come from `<workdir>/embeddings/`.
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
from slim_jax.data import prepare, sequences, sparsity
from slim_jax.pipeline import layout as layout_lib
from slim_jax.recommenders import slim
from slim_jax.recommenders.rationale_table import RationaleTable
from slim_jax.train import loop, metrics, seed_stack
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
  learning_rate: float = 1e-3
  head_share: float = 0.2  # the most popular share of items that counts as "head"
  cold_max_count: int = 5  # a cold-start user's test item has at most this many interactions

  def __post_init__(self):
    if not 0.0 < self.head_share < 1.0:
      raise ValueError(f"--head_share={self.head_share} must be in (0, 1)")
    if self.cold_max_count < 0:
      raise ValueError(f"--cold_max_count={self.cold_max_count} must be >= 0")


def recommend_dir(workdir: str, spec: GridSpec) -> str:
  del spec  # one grid per workdir
  return layout_lib.RunLayout(workdir).recommend


def text_vectors(workdir: str, name: str) -> np.ndarray:
  path = layout_lib.RunLayout(workdir).vectors(name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run the encode stage (and the teacher "
                            "or generate stage that writes its rationales) first")
  return np.load(path)


def rationale_table(workdir: str, names: tuple[str, ...]) -> RationaleTable:
  """The rationales `names` (slim.Variant.vector_names: evaluation and training) with
  their presence masks and cutoffs, from the encode stage's outputs."""
  layout = layout_lib.RunLayout(workdir)
  kinds = []
  for name in names:
    vectors = text_vectors(workdir, name)
    for path in (layout.present_mask(name), layout.cutoffs(name)):
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: re-run the encode stage (its "
                                "outputs predate causal rationales)")
    kinds.append((vectors, np.load(layout.present_mask(name)), np.load(layout.cutoffs(name))))
  return RationaleTable.from_kinds(kinds)


def load_data(workdir: str) -> dataset_lib.SequenceDataset:
  return dataset_lib.load(prepare.prepared_dir(workdir))


def full_training_counts(workdir: str, data: dataset_lib.SequenceDataset) -> np.ndarray:
  """[V+1] training counts of the full data: saved by a thinned preparation, else `data`'s."""
  path = os.path.join(prepare.prepared_dir(workdir), sparsity.FULL_COUNTS_FILE)
  return np.load(path) if os.path.exists(path) else analysis.training_counts(data)


def make_model(workdir: str, spec: GridSpec, data, backbone: str, variant: str):
  names = slim.variant(variant).vector_names()
  return slim.make_model(variant, "sasrec" if backbone == "none" else backbone,
                         num_items=data.num_items, item_text=text_vectors(workdir, "items"),
                         rationales=rationale_table(workdir, names) if names else None,
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


# Bumped whenever a change to the training code changes the numbers a seed produces, so
# results trained before it are trained again instead of being mixed with newer ones.
TRAINING_VERSION = 3  # 2: dropout masks from packed random bits (slim_jax/models/layers.py);
# 3: SR-GNN readout sums attention weights per state (float rounding)
# Bumped per model (a backbone's name, or 'id_agnostic') when a change
# to that model alone changes its seeds' numbers: only its cells train again. A model not
# listed is at version 1 and adds nothing to the fingerprint.
MODEL_VERSIONS = {"id_agnostic": 2}  # 2: scores <s, z> / sqrt(D) (recommenders/slim.py)
# Which cells and seeds a run asks for: not part of any seed's fingerprint, so a grid run
# in pieces (--backbones, --variants, --seeds on one workdir) keeps every piece's seeds.
_SELECTION_FIELDS = ("backbones", "variants", "seeds")


def model_name(backbone: str, variant: str) -> str:
  """The model a cell trains: 'id_agnostic' for ID-agnostic variants, else the backbone."""
  return "id_agnostic" if slim.is_id_agnostic(variant) else backbone


def _fingerprint_parts(workdir: str, spec: GridSpec) -> dict:
  layout = layout_lib.RunLayout(workdir)
  vectors = sorted(glob.glob(layout.vectors("*")))  # not the folder: it holds an XLA cache
  inputs = {os.path.relpath(path, workdir): io.hash_path(path)
            for path in [layout.data, layout.embeddings_manifest, *vectors]}
  settings = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _SELECTION_FIELDS}
  return {"spec": settings, "training_version": TRAINING_VERSION, "inputs": inputs}


def _cell_fingerprint(parts: dict, model: str) -> str:
  if model in MODEL_VERSIONS:
    parts = {**parts, f"{model}_version": MODEL_VERSIONS[model]}
  return io.fingerprint(parts)


def default_fingerprint(workdir: str, spec: GridSpec, model: str = "") -> str:
  """What a seed's result of `model` (`model_name`) depends on: the training settings of
  the spec (not which cells and seeds it selects), the training code's version and the
  model's (`MODEL_VERSIONS`), the prepared data, the embeddings."""
  return _cell_fingerprint(_fingerprint_parts(workdir, spec), model)


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


def _per_user(analysed: dict, head: np.ndarray) -> dict[str, list[float]]:
  """{metric: [U]} of slim_jax/analysis.py's user_analysis, plus head@10 per user."""
  out = {m: [float(x) for x in v] for m, v in analysed.items() if m != "top"}
  out[f"head@{analysis.TOP_K}"] = [float(x) for x in head[analysed["top"]].mean(1)]
  return out


def most_popular_row(data, test: sequences.EvalSet, head: np.ndarray,
                     seeds: tuple[int, ...]) -> dict:
  """The most-popular ranker on the test candidates: training counts, ties broken at
  random (one draw per seed); head@10 from its top-10 over every unseen item."""
  counts = analysis.training_counts(data).astype(np.float64)  # [V+1]
  row = {"backbone": "none", "variant": "most-popular", "seeds": list(seeds), "test": [],
         "per_user": [], "best_epoch": [], "epochs_run": [], "history": []}
  for seed in seeds:
    scores = counts + np.random.default_rng(seed).uniform(0.0, 0.5, counts.shape)  # [V+1]
    ranked = metrics.sampled_ranking_metrics(scores[test.candidates])  # {m: [U]}
    full = np.broadcast_to(scores, (len(test), len(scores))).copy()
    full[test.exclude_mask(data.num_items)] = -np.inf
    top = np.argsort(-full, axis=1, kind="stable")[:, :analysis.TOP_K]  # [U, 10]
    per_user = _per_user({**{m: np.asarray(v) for m, v in ranked.items()}, "top": top}, head)
    row["per_user"].append(per_user)
    row["test"].append({m: float(np.mean(v)) for m, v in per_user.items()
                        if m in ranked})
  return row


def _train_fraction(workdir: str) -> float:
  """The share of each training prefix the prepared data kept (1: a full run)."""
  try:
    return float(prepare.load_summary(workdir).get("train_fraction", 1.0))
  except FileNotFoundError:  # prepared without a summary (tests, old folders)
    return 1.0


def teacher_users(workdir: str, num_users: int) -> list[int]:
  """Users with a teacher evaluation rationale (the users SLIM- and SLIM compare on)."""
  path = layout_lib.RunLayout(workdir).present_mask("teacher")
  if not os.path.exists(path):
    return []
  present = np.load(path)
  return [int(u) for u in np.flatnonzero(present[:num_users])]


def train_grid(workdir: str, spec: GridSpec, log: Callable[[str], None] = print,
               retrain: bool = False) -> dict:
  """Trains every cell and seed of `spec` not yet done (with `retrain`, every one of them
  again); writes and returns the results dict."""
  fingerprint_parts = _fingerprint_parts(workdir, spec)  # hashed once for every cell
  data = load_data(workdir)
  negatives = sequences.load_negatives(prepare.prepared_dir(workdir))
  test = sequences.eval_set(data, "test", negatives, spec.max_len)
  full_counts = full_training_counts(workdir, data)  # head and cold: from the full data
  head = analysis.head_items(full_counts, spec.head_share)
  cold = analysis.cold_users(data, full_counts, spec.cold_max_count)
  rows = []
  for backbone, variant in cells(spec):
    fingerprint = _cell_fingerprint(fingerprint_parts, model_name(backbone, variant))
    model = make_model(workdir, spec, data, backbone, variant)
    row = {"backbone": backbone, "variant": variant, "seeds": list(spec.seeds), "test": [],
           "per_user": [], "best_epoch": [], "epochs_run": [], "history": [],
           "train_seconds": []}
    run_dirs = {seed: os.path.join(recommend_dir(workdir, spec), backbone, variant,
                                   f"seed_{seed}") for seed in spec.seeds}
    if retrain:
      for run_dir in run_dirs.values():
        shutil.rmtree(run_dir, ignore_errors=True)
    results = {seed: _reusable_result(run_dirs[seed], fingerprint) for seed in spec.seeds}
    todo = [seed for seed in spec.seeds if results[seed] is None]
    if todo:  # the seeds still to train, as one stack (slim_jax/train/seed_stack.py)
      config = loop.TrainConfig(loss="bce", epochs=spec.epochs, batch_size=spec.batch,
                                patience=spec.patience, eval_batch_size=spec.batch,
                                max_len=spec.max_len, learning_rate=spec.learning_rate,
                                progress=False)
      start = time.perf_counter()
      trained = seed_stack.train_and_evaluate_seeds(
          model, data, negatives, config, todo, [run_dirs[s] for s in todo],
          name=f"{backbone}/{variant}", log=lambda _: None)
      wall = time.perf_counter() - start
      for seed, result in zip(todo, trained):
        result["wall_seconds"] = wall  # of the whole stack
        result["fingerprint"] = fingerprint
        result["per_user"] = _per_user({**result.pop("test_per_user"),
                                        "top": result.pop("test_top")}, head)
        io.write_json(os.path.join(run_dirs[seed], "result.json"), result, indent=1,
                      default=float)
        results[seed] = result
        log(f"  {backbone}/{variant}/seed {seed}: test " + "  ".join(
            f"{k} {v:.4f}" for k, v in result["test"].items())
            + f"  (best epoch {result['best_epoch']} of {result['epochs_run']})")
      log(f"  {backbone}/{variant}: {len(todo)} seeds trained together in {wall:.0f} s")
    for seed in spec.seeds:
      for key in ("test", "per_user", "best_epoch", "epochs_run", "history"):
        row[key].append(results[seed][key])
      # The seed's share of its stack's wall-clock seconds (compiling and testing included).
      row["train_seconds"].append(results[seed].get("wall_seconds", 0.0)
                                  / results[seed].get("stacked_seeds", 1))
    rows.append(row)
  rows.append(most_popular_row(data, test, head, spec.seeds))
  results = {"format": 2, "test_users": [int(u) for u in test.users],
             "cold_users": [int(u) for u in cold],
             "teacher_users": teacher_users(workdir, data.num_users),
             "head_share": spec.head_share,
             "train_fraction": _train_fraction(workdir),
             "rows": rows}
  io.write_json(os.path.join(recommend_dir(workdir, spec), RESULTS_FILE), results,
                default=float)
  return results


def read_results(workdir: str, spec: GridSpec) -> dict:
  """The results dict `train_grid` returns, from the recommend stage's results.json, so the
  report needs no training code."""
  path = os.path.join(recommend_dir(workdir, spec), RESULTS_FILE)
  results = io.read_json(path, "grid results")
  if not isinstance(results, dict) or results.get("format") != 2:
    raise ValueError(f"{path} was written by an older recommend stage; rerun it "
                     "(run_slim.py --force=recommend)")
  return results


def interpretability_cases(workdir: str, spec: GridSpec, student: dict,
                           num_users: int = 3) -> list[dict]:
  """History, student rationale, top-10 (unseen items) of the first SLIM or ID-agnostic
  model, and the held-out item, for the first `num_users` users."""
  variant = next((v for v in ("slim", "agnostic") if v in spec.variants), None)
  if variant is None:
    return []
  backbone = "none" if slim.is_id_agnostic(variant) else spec.backbones[0]
  data = load_data(workdir)
  test = sequences.eval_set(data, "test", sequences.load_negatives(
      prepare.prepared_dir(workdir)), spec.max_len)
  users = np.arange(min(num_users, data.num_users))
  subset = test.rows(users)
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
