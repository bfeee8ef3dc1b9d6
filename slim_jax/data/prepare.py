"""From raw interactions to the prepared dataset, and the prepare-or-load stage on disk.

The common preparation, whatever the source:

1. sort each user's interactions by time; ties keep file order (a stable sort);
2. drop repeated (user, item) pairs, keeping the earliest;
3. k-core filtering iterated to a fixed point: every item has >= `core` interactions and
   every user >= max(`core`, 3) (three are needed for train / valid / test); by default
   5 for Amazon and synthetic data, 0 for MovieLens-100k (as RecBole ships and evaluates
   it: every user there has >= 20 ratings already);
4. dense ids: items 1..N (0 is padding) and users 0..U-1, both in natural order of the
   raw ids;
5. item metadata read for the items kept; a summary of every count and what was dropped.

`prepare_or_load` writes `<workdir>/data/` (items.jsonl, users.jsonl, data_summary.json,
negatives.npz, manifest.json) and, when the manifest matches the same inputs and options,
loads the folder instead of recomputing. Every file is written atomically, and the
manifest last, so an interrupted run is recomputed rather than half-loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from slim_jax.data import amazon
from slim_jax import io
from slim_jax.data import dataset as dataset_lib
from slim_jax.data import movielens
from slim_jax.data import raw as raw_lib
from slim_jax.data import sequences
from slim_jax.data import sparsity
from slim_jax.data import synthetic
from slim_jax.pipeline.layout import RunLayout

DATASETS = ("ml-100k", "amazon", "synthetic")
MANIFEST_FILE = "manifest.json"
DEFAULT_CORE = {"ml-100k": 0, "amazon": 5, "synthetic": 5}  # RecBole's ml-100k: no filter
DEFAULT_SEED = 0
DEFAULT_NUM_NEGATIVES = 100
DEFAULT_MAX_LEN = 50  # the models' maximum sequence length, reported in the summary
MIN_USER_INTERACTIONS = 3  # one training item, one validation target, one test target
_FORMAT = 1


def prepared_dir(workdir: str) -> str:
  """Where a run keeps its prepared dataset."""
  return RunLayout(workdir).data


def _natural_order(names: list[str]) -> np.ndarray:
  """Indices that sort string ids numerically when they are numbers, else as text."""
  keys = [(0, int(n), n) if n.isdigit() else (1, 0, n) for n in names]
  return np.asarray(sorted(range(len(names)), key=keys.__getitem__), np.int64)


def k_core(users: np.ndarray, items: np.ndarray, core: int,
           min_user: int = MIN_USER_INTERACTIONS) -> tuple[np.ndarray, int]:
  """Mask of the interactions kept by iterated k-core filtering, and the rounds it took.

  At the fixed point every kept item has >= core and every kept user >= max(core,
  min_user) kept interactions.
  """
  user_min, item_min = max(core, min_user), core
  keep = np.ones(len(users), bool)
  rounds = 0
  while True:
    user_count = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
    item_count = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
    bad = keep & ((user_count[users] < user_min) | (item_count[items] < item_min))
    if not bad.any():
      return keep, rounds
    keep &= ~bad
    rounds += 1


def sample_users(users: np.ndarray, max_users: int, seed: int) -> np.ndarray:
  """Mask of the interactions [M] of `max_users` users drawn uniformly (seeded) from those
  in `users` [M]; all of them when there are no more than `max_users`."""
  distinct = np.unique(users)
  if max_users <= 0 or len(distinct) <= max_users:
    return np.ones(len(users), bool)
  chosen = np.random.default_rng(seed).choice(distinct, size=max_users, replace=False)
  return np.isin(users, chosen)


def build(data: raw_lib.RawData, core: int = 5, name: str = "", max_len: int = DEFAULT_MAX_LEN,
          max_users: int = 0, seed: int = DEFAULT_SEED
          ) -> tuple[dataset_lib.SequenceDataset, dict]:
  """Filters, orders and re-indexes raw interactions; returns the dataset and its summary.

  `max_users` > 0 keeps a uniform sample of that many users (drawn with `seed`, before the
  k-core filter, every interaction of the users drawn): a smaller run of the same data.
  """
  users, items, times = data.log.arrays()  # [M] each, file order
  num_raw = len(users)
  if num_raw == 0:
    raise ValueError(f"no interactions were read from {data.report.get('files')}")
  # Out-of-order lines: a user's record earlier in time than the user's previous record.
  by_user = np.argsort(users, kind="stable")
  same_user = users[by_user][1:] == users[by_user][:-1]
  out_of_order = int(np.sum(same_user & (times[by_user][1:] < times[by_user][:-1])))

  order = np.lexsort((times, users))  # stable: ties in time keep file order
  users, items, times = users[order], items[order], times[order]
  pair = users.astype(np.int64) * len(data.log.items) + items
  _, first = np.unique(pair, return_index=True)
  first.sort()
  duplicates = num_raw - len(first)
  users, items, times = users[first], items[first], times[first]

  sampled = sample_users(users, max_users, seed)
  users_before_sample = len(np.unique(users))
  users, items, times = users[sampled], items[sampled], times[sampled]

  keep, rounds = k_core(users, items, core)
  users, items, times = users[keep], items[keep], times[keep]
  if len(users) == 0:
    raise ValueError(f"{core}-core filtering left no interactions (from {num_raw}); "
                     "lower --core")

  # Dense ids in natural order of the raw ids.
  kept_items = np.unique(items)
  item_names = [data.log.items.names[i] for i in kept_items]
  item_rank = _natural_order(item_names)
  item_id = np.zeros(len(data.log.items), np.int32)
  item_id[kept_items[item_rank]] = np.arange(1, len(kept_items) + 1, dtype=np.int32)
  kept_users = np.unique(users)
  user_names = [data.log.users.names[u] for u in kept_users]
  user_rank = _natural_order(user_names)
  user_id = np.zeros(len(data.log.users), np.int64)
  user_id[kept_users[user_rank]] = np.arange(len(kept_users))

  new_users = user_id[users]
  regroup = np.argsort(new_users, kind="stable")  # keeps time order within a user
  seq_items, seq_times = item_id[items][regroup], times[regroup]
  bounds = np.flatnonzero(np.diff(new_users[regroup])) + 1
  sequences_ = np.split(seq_items, bounds)
  timestamps = np.split(seq_times, bounds)

  ordered_item_names = [item_names[i] for i in item_rank]
  meta = data.read_meta(set(ordered_item_names))
  empty = raw_lib.ItemMeta(title="", brand="", categories=(), text="")
  items_ = []
  for index, raw_id in enumerate(ordered_item_names):
    m = meta.get(raw_id, empty)
    items_.append(dataset_lib.Item(item_id=index + 1, raw_id=raw_id, title=m.title,
                                   brand=m.brand, categories=m.categories,
                                   text=m.text or f"Item {raw_id}"))
  dataset = dataset_lib.SequenceDataset(
      items=items_, user_raw_ids=[user_names[i] for i in user_rank], sequences=sequences_,
      timestamps=timestamps, name=name)

  lengths = np.asarray([len(s) for s in sequences_])
  num_users, num_items, num_inter = len(lengths), len(items_), int(lengths.sum())
  summary = {
      "dataset": name,
      "users": num_users,
      "items": num_items,
      "interactions": num_inter,
      "sparsity": 1.0 - num_inter / (num_users * num_items),
      "mean_length": float(lengths.mean()),
      "median_length": float(np.median(lengths)),
      "min_length": int(lengths.min()),
      "max_length": int(lengths.max()),
      "train_transitions": int(np.maximum(lengths - 3, 0).sum()),
      "max_len": max_len,
      "users_longer_than_max_len": int(np.sum(lengths - 1 > max_len)),
      "before_filtering": {"users": len(data.log.users), "items": len(data.log.items),
                           "interactions": num_raw},
      "lines_skipped": data.bad_lines.summary(),
      "duplicates_removed": int(duplicates),
      "out_of_order_interactions": out_of_order,
      "user_sample": ({"max_users": max_users, "from_users": users_before_sample,
                       "seed": seed} if max_users > 0 else None),
      "core": core,
      "min_user_interactions": max(core, MIN_USER_INTERACTIONS),
      "core_rounds": rounds,
      "removed_by_core": {
          "interactions": int(len(keep) - keep.sum()),
          "users": len(data.log.users) - num_users,
          "items": int(len(data.log.items) - num_items)},
      "items_without_metadata": sum(1 for n in ordered_item_names if n not in meta),
      "items_missing_title": sum(1 for it in items_ if not it.title),
      "items_missing_brand": sum(1 for it in items_ if not it.brand),
      "items_missing_categories": sum(1 for it in items_ if not it.categories),
      "source": data.report,
  }
  return dataset, summary


def _file_stamp(path: str) -> dict:
  stat = os.stat(path)
  return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _source(dataset_name: str, data_dir: str | None, workdir: str, options: dict):
  """(manifest inputs, a function returning the RawData) for one dataset name."""
  skip = options["skip_bad_lines"]
  if dataset_name == "ml-100k":
    files = movielens.input_files(data_dir)
    return ([_file_stamp(f) for f in files],
            lambda: movielens.load(os.path.dirname(files[0]), skip_bad_lines=skip))
  if dataset_name == "amazon":
    _, _, reviews, meta = amazon.find_files(data_dir, options["release"], options["category"])
    return ([_file_stamp(reviews), _file_stamp(meta)],
            lambda: amazon.load(data_dir, skip, options["release"], options["category"]))
  if dataset_name == "synthetic":
    config = options["synthetic"]
    release = options["release"] or "2014"
    out = os.path.join(workdir, "raw", "synthetic")

    def generate_and_load():
      folders = synthetic.write_amazon(out, config)
      return amazon.load(folders[release], skip, release)

    return [{"synthetic": dataclasses.asdict(config), "release": release}], generate_and_load
  raise ValueError(f"unknown dataset {dataset_name!r}; expected one of {DATASETS}")


def _matches(manifest: dict, wanted: dict, check_inputs: bool) -> bool:
  """Whether a stored manifest satisfies a request; None options accept any stored value."""
  if manifest.get("format") != _FORMAT or manifest.get("dataset") != wanted["dataset"]:
    return False
  if check_inputs and manifest.get("inputs") != wanted["inputs"]:
    return False
  stored = manifest.get("options", {})
  return all(value is None or stored.get(key) == value
             for key, value in wanted["options"].items())


def _read_manifest(out: str) -> dict | None:
  path = os.path.join(out, MANIFEST_FILE)
  outputs = [dataset_lib.ITEMS_FILE, dataset_lib.USERS_FILE, dataset_lib.SUMMARY_FILE,
             sequences.NEGATIVES_FILE]
  if not os.path.exists(path) or not all(os.path.exists(os.path.join(out, f))
                                         for f in outputs):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return None


def _load_prepared(out: str, dataset_name: str) -> dataset_lib.SequenceDataset:
  # Loading never writes: the folder's content (which later stages fingerprint) changes
  # only when the data is prepared again. The summary's max_len is the preparation's.
  return dataset_lib.load(out, name=dataset_name)


def prepare_or_load(dataset_name: str, data_dir: str | None, workdir: str, *,
                    core: int | None = None, max_len: int = DEFAULT_MAX_LEN, skip_bad_lines: bool = False,
                    seed: int | None = None, num_negatives: int | None = None,
                    release: str | None = None, category: str | None = None,
                    synthetic_config: synthetic.SyntheticConfig | None = None,
                    max_users: int | None = None, train_fraction: float | None = None,
                    force: bool = False) -> dataset_lib.SequenceDataset:
  """Prepares `dataset_name` into `<workdir>/data/`, or loads it if already prepared.

  The folder is reused when its manifest records the same dataset, the same input files
  (path, size, modification time; for 'synthetic' the generator settings) and the same
  options. An option left at None accepts whatever the existing preparation used, and
  takes its default when there is none: so every stage of a run (training, teacher, ...)
  calling with defaults reads the same data that experiments/prepare_data.py wrote.
  `max_len` and `skip_bad_lines` never force a rebuild: max_len is only reported in the
  summary written at preparation, and a folder prepared with skipped lines stays valid. A
  load never writes into the folder (later stages fingerprint its content).

  Args:
    dataset_name: 'ml-100k' (data_dir defaults to the set-up's cache), 'amazon' (data_dir
      holds one category's files) or 'synthetic' (generated into <workdir>/raw/).
    data_dir: the source folder (ignored for 'synthetic'). May be None for a workdir
      that is already prepared.
    workdir: the run folder.
    core: k of the k-core filter (0 or 1: no item filter; users always keep >= 3).
      Default (None): DEFAULT_CORE[dataset_name], 0 for ml-100k (as RecBole) and 5 for
      Amazon and synthetic.
    max_len: the model's maximum sequence length (reported in the summary).
    skip_bad_lines: count and skip malformed lines instead of failing on the first.
    seed: seed of the stored evaluation negatives (default 0).
    num_negatives: negatives per validation/test user (default 100).
    release: Amazon release '2014'/'2018' when the folder is ambiguous (synthetic: which
      generated format to read, default 2014).
    category: Amazon category when the folder holds several.
    synthetic_config: generator settings for 'synthetic' (default SyntheticConfig()).
    max_users: keep a uniform sample of this many users, drawn with `seed` (default 0:
      every user).
    train_fraction: the sparsity analysis (slim_jax/data/sparsity.py): keep this fraction
      of each training prefix (default 1: all of it); the evaluation negatives and the
      full data's training counts (head items, cold-start users) come from the full data.
    force: recompute even when the folder matches.
  """
  if dataset_name not in DATASETS:
    raise ValueError(f"--dataset={dataset_name!r} is not one of {DATASETS}")
  for name, value, low in (("core", core, 0), ("max_len", max_len, 1),
                           ("num_negatives", num_negatives, 1), ("max_users", max_users, 0)):
    if value is not None and value < low:
      raise ValueError(f"--{name}={value} must be >= {low}")
  if train_fraction is not None and not 0.0 < train_fraction <= 1.0:
    raise ValueError(f"--train_fraction={train_fraction} must be in (0, 1]")
  requested = {"core": core, "seed": seed, "num_negatives": num_negatives,
               "release": release, "category": category, "max_users": max_users,
               "train_fraction": train_fraction}
  out = prepared_dir(workdir)
  existing = None if force else _read_manifest(out)
  options = {**requested, "skip_bad_lines": skip_bad_lines,
             "synthetic": (synthetic_config or synthetic.SyntheticConfig())
                          if dataset_name == "synthetic" else None}
  try:
    inputs, read = _source(dataset_name, data_dir, workdir, options)
  except FileNotFoundError:
    # The sources are gone or not given, but this workdir is already prepared: use it.
    if data_dir is None and existing and _matches(
        existing, {"dataset": dataset_name, "options": requested}, check_inputs=False):
      return _load_prepared(out, dataset_name)
    raise
  wanted = json.loads(json.dumps(  # the form a manifest has once read back
      {"format": _FORMAT, "dataset": dataset_name, "options": requested, "inputs": inputs}))
  if existing and _matches(existing, wanted, check_inputs=True):
    return _load_prepared(out, dataset_name)

  core = DEFAULT_CORE[dataset_name] if core is None else core
  seed = DEFAULT_SEED if seed is None else seed
  num_negatives = DEFAULT_NUM_NEGATIVES if num_negatives is None else num_negatives
  max_users = max_users or 0
  train_fraction = 1.0 if train_fraction is None else train_fraction
  os.makedirs(out, exist_ok=True)
  manifest_path = os.path.join(out, MANIFEST_FILE)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # the outputs below are about to change
  dataset, summary = build(read(), core=core, name=dataset_name, max_len=max_len,
                           max_users=max_users, seed=seed)
  negatives = sequences.sample_eval_negatives(dataset, num_negatives, seed)
  summary["negatives"] = {"per_user": num_negatives, "seed": seed,
                          "file": sequences.NEGATIVES_FILE}
  full_counts = os.path.join(out, sparsity.FULL_COUNTS_FILE)
  if train_fraction < 1.0:
    io.save_npy(full_counts, sparsity.training_counts(dataset))
    dataset = sparsity.thin_training(dataset, train_fraction, seed)
    summary["train_fraction"] = train_fraction
  elif os.path.exists(full_counts):
    os.remove(full_counts)
  dataset_lib.save(dataset, out)
  sequences.save_negatives(out, negatives)
  io.write_json(os.path.join(out, dataset_lib.SUMMARY_FILE), summary)
  wanted["options"].update(core=core, seed=seed, num_negatives=num_negatives,
                           skip_bad_lines=skip_bad_lines, max_users=max_users,
                           train_fraction=train_fraction)
  io.write_json(manifest_path, wanted)  # last: marks the folder complete
  return dataset


def load_summary(workdir: str) -> dict:
  path = os.path.join(prepared_dir(workdir), dataset_lib.SUMMARY_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: prepare the data first "
                            "(experiments/prepare_data.py with this --workdir)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)
