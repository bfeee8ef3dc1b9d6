"""Common preparation: k-core fixed point, time order, dense ids, prepare-or-load caching."""

import json
import os

import numpy as np
import pytest

from slim_jax import io
from slim_jax.data import dataset as dataset_lib
from slim_jax.data import prepare
from slim_jax.data import raw
from slim_jax.data import sequences
from slim_jax.data import synthetic


def _raw(records, meta=None):
  log = raw.InteractionLog()
  for user, item, time in records:
    log.add(user, item, time)
  meta = meta or {}
  return raw.RawData(log=log, read_meta=lambda keep: {k: v for k, v in meta.items() if k in keep},
                     bad_lines=raw.BadLines(False), report={"files": []})


def _naive_core(pairs, core):
  """Removes one user or item at a time until nothing is below the threshold."""
  pairs = set(pairs)
  while True:
    users, items = {}, {}
    for u, i in pairs:
      users[u] = users.get(u, 0) + 1
      items[i] = items.get(i, 0) + 1
    low = [(u, i) for u, i in pairs if users[u] < max(core, 3) or items[i] < core]
    if not low:
      return pairs
    pairs -= set(low)


@pytest.mark.parametrize("core", [0, 2, 5])
def test_k_core_reaches_the_fixed_point(core):
  rng = np.random.default_rng(core)
  # A skewed random graph: many users and items fall below the core, in cascades.
  users = rng.zipf(1.6, 3000) % 200
  items = rng.zipf(1.4, 3000) % 150
  pairs = sorted(set(zip(users.tolist(), items.tolist())))
  records = [(str(u), str(i), t) for t, (u, i) in enumerate(pairs)]
  ds, summary = prepare.build(_raw(records), core=core)
  kept = {(ds.user_raw_ids[u], ds.item(i).raw_id) for u, s in enumerate(ds.sequences)
          for i in s}
  expected = {(str(u), str(i)) for u, i in _naive_core(pairs, core)}
  assert kept == expected
  user_counts = np.asarray([len(s) for s in ds.sequences])
  item_counts = np.bincount(np.concatenate(ds.sequences), minlength=ds.num_items + 1)[1:]
  assert user_counts.min() >= max(core, 3) and item_counts.min() >= core
  assert summary["interactions"] == len(expected)
  assert summary["removed_by_core"]["interactions"] == len(pairs) - len(expected)
  if core == 5:
    assert summary["core_rounds"] > 1  # the cascade needed several rounds


def test_time_order_ties_keep_file_order_and_ids_are_dense():
  records = [("u10", "b", 5), ("u2", "c", 1), ("u10", "a", 5), ("u10", "c", 1),
             ("u2", "a", 1), ("u2", "b", 1), ("u10", "d", 9), ("u2", "d", 0)]
  ds, summary = prepare.build(_raw(records), core=0)
  assert ds.user_raw_ids == ["u10", "u2"]  # text order
  assert [it.raw_id for it in ds.items] == ["a", "b", "c", "d"]
  names = lambda u: [ds.item(i).raw_id for i in ds.sequences[u]]
  assert names(0) == ["c", "b", "a", "d"]  # b before a: same time, file order
  assert names(1) == ["d", "c", "a", "b"]
  assert summary["sparsity"] == pytest.approx(0.0)
  assert summary["mean_length"] == 4.0


def test_numeric_ids_sort_as_numbers():
  records = [(str(u), str(i), t) for t, (u, i) in enumerate(
      [(10, 100), (10, 9), (10, 20), (2, 9), (2, 20), (2, 100)])]
  ds, _ = prepare.build(_raw(records), core=0)
  assert ds.user_raw_ids == ["2", "10"]
  assert [it.raw_id for it in ds.items] == ["9", "20", "100"]


def test_users_need_three_interactions_even_without_core():
  records = [("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("b", "z", 3)]
  ds, summary = prepare.build(_raw(records), core=0)
  assert ds.user_raw_ids == ["b"]
  assert summary["removed_by_core"]["users"] == 1


def test_everything_filtered_is_an_error():
  with pytest.raises(ValueError, match="lower --core"):
    prepare.build(_raw([("a", "x", 1), ("a", "y", 2), ("a", "z", 3)]), core=5)


def test_user_sample_keeps_whole_histories_of_a_seeded_subset():
  records = [(f"u{u}", f"i{(u + k) % 7}", k) for u in range(20) for k in range(4)]
  full, _ = prepare.build(_raw(records), core=0)
  ds, summary = prepare.build(_raw(records), core=0, max_users=5, seed=3)
  again, _ = prepare.build(_raw(records), core=0, max_users=5, seed=3)
  other, _ = prepare.build(_raw(records), core=0, max_users=5, seed=4)
  assert len(ds.user_raw_ids) == 5 and ds.user_raw_ids == again.user_raw_ids
  assert ds.user_raw_ids != other.user_raw_ids
  assert all(len(s) == 4 for s in ds.sequences)  # every interaction of a user drawn
  assert summary["user_sample"] == {"max_users": 5, "from_users": 20, "seed": 3}
  everyone, summary = prepare.build(_raw(records), core=0, max_users=50)
  assert everyone.user_raw_ids == full.user_raw_ids and summary["user_sample"]["from_users"] == 20


def _config():
  return synthetic.SyntheticConfig(num_users=150, num_items=150, num_clusters=10,
                                   max_length=20)


def test_prepare_or_load_writes_then_loads(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  ds = prepare.prepare_or_load("synthetic", None, workdir, synthetic_config=_config())
  out = prepare.prepared_dir(workdir)
  for name in ("items.jsonl", "users.jsonl", "data_summary.json", "negatives.npz",
               "manifest.json"):
    assert os.path.exists(os.path.join(out, name)), name
  assert not [n for n in os.listdir(out) if ".tmp" in n]
  summary = prepare.load_summary(workdir)
  assert summary["users"] == ds.num_users == 150
  negs = sequences.load_negatives(out)
  assert negs["test"].shape == (150, 100)

  # Second call with the same inputs: loaded from disk, nothing rebuilt.
  calls = []
  monkeypatch.setattr(prepare, "build", lambda *a, **k: calls.append(1))
  again = prepare.prepare_or_load("synthetic", None, workdir, synthetic_config=_config())
  assert not calls
  assert [s.tolist() for s in again.sequences] == [s.tolist() for s in ds.sequences]
  assert again.items == ds.items
  # A different option rebuilds.
  monkeypatch.undo()
  other = prepare.prepare_or_load("synthetic", None, workdir, synthetic_config=_config(),
                                  seed=1)
  assert other.num_users == 150
  assert not np.array_equal(sequences.load_negatives(out)["test"], negs["test"])
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["options"]["seed"] == 1


def _write_movielens(folder, rows):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "ml-100k.inter"), "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    f.writelines(f"{u}\t{i}\t4\t{t}\n" for u, i, t in rows)
  with open(os.path.join(folder, "ml-100k.item"), "w") as f:
    f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
    f.writelines(f"{i}\tMovie {i}\t1995\tDrama\n" for i in range(1, 200))


def test_changed_input_file_is_noticed(tmp_path):
  rng = np.random.default_rng(0)
  rows = [(u, int(i), t) for u in range(1, 40)
          for t, i in enumerate(rng.choice(np.arange(1, 160), 12, replace=False))]
  folder = str(tmp_path / "ml")
  _write_movielens(folder, rows)
  workdir = str(tmp_path / "run")
  first = prepare.prepare_or_load("ml-100k", folder, workdir, core=0)
  assert first.num_users == 39
  _write_movielens(folder, rows + [(99, 1, 1), (99, 2, 2), (99, 3, 3)])
  second = prepare.prepare_or_load("ml-100k", folder, workdir, core=0)
  assert second.num_users == 40
  assert prepare.load_summary(workdir)["users"] == 40


def test_missing_prepared_folder_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare_data.py"):
    prepare.load_summary(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="prepare_data.py"):
    dataset_lib.load(str(tmp_path))
  with pytest.raises(ValueError, match="not one of"):
    prepare.prepare_or_load("netflix", None, str(tmp_path))


def test_unset_options_reuse_the_existing_preparation(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = _config()
  prepare.prepare_or_load("synthetic", None, workdir, synthetic_config=config, core=3,
                          seed=7, num_negatives=50, max_len=10)
  calls = []
  real_build = prepare.build
  monkeypatch.setattr(prepare, "build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
  # Another stage with defaults (and another max_len) reads the same folder.
  before = io.hash_path(prepare.prepared_dir(workdir))
  prepare.prepare_or_load("synthetic", None, workdir, synthetic_config=config, max_len=30)
  assert not calls
  assert io.hash_path(prepare.prepared_dir(workdir)) == before  # a load writes nothing
  summary = prepare.load_summary(workdir)
  assert summary["core"] == 3 and summary["negatives"]["seed"] == 7
  assert summary["max_len"] == 10  # the preparation's
  assert sequences.load_negatives(prepare.prepared_dir(workdir))["test"].shape[1] == 50
  # A user sample is an option like the others: recorded, and kept by later defaults.
  prepare.prepare_or_load("synthetic", None, workdir, synthetic_config=config, core=3,
                          seed=7, num_negatives=50, max_users=40)
  assert len(prepare.prepare_or_load("synthetic", None, workdir,
                                     synthetic_config=config).user_raw_ids) <= 40
  assert calls == [1]
  calls.clear()
  # An explicit different value rebuilds.
  prepare.prepare_or_load("synthetic", None, workdir, synthetic_config=config, core=5)
  assert calls == [1]
  assert prepare.load_summary(workdir)["core"] == 5
  assert prepare.load_summary(workdir)["negatives"] == {"per_user": 100, "seed": 0,
                                                        "file": "negatives.npz"}


def test_prepared_amazon_folder_loads_without_the_sources(tmp_path):
  folders = synthetic.write_amazon(str(tmp_path / "src"), _config())
  workdir = str(tmp_path / "run")
  ds = prepare.prepare_or_load("amazon", folders["2018"], workdir)
  again = prepare.prepare_or_load("amazon", None, workdir)  # a later stage, no --data_dir
  assert again.items == ds.items
  with pytest.raises(FileNotFoundError):
    prepare.prepare_or_load("amazon", None, str(tmp_path / "empty"))


def test_a_thinned_preparation_keeps_targets_negatives_and_full_counts(tmp_path):
  from slim_jax.data import sparsity
  full = prepare.prepare_or_load("synthetic", None, str(tmp_path / "full"))
  half = prepare.prepare_or_load("synthetic", None, str(tmp_path / "half"), train_fraction=0.5)
  assert half.num_users == full.num_users
  for u in range(full.num_users):
    assert half.sequences[u][-2:].tolist() == full.sequences[u][-2:].tolist()
    n = len(full.train_prefix(u))
    assert len(half.train_prefix(u)) == max(1, round(0.5 * n))
    assert set(half.train_prefix(u).tolist()) <= set(full.train_prefix(u).tolist())
  negatives = [sequences.load_negatives(prepare.prepared_dir(str(tmp_path / d)))
               for d in ("full", "half")]
  for split in sequences.SPLITS:
    np.testing.assert_array_equal(negatives[0][split], negatives[1][split])
  counts = np.load(os.path.join(prepare.prepared_dir(str(tmp_path / "half")),
                                sparsity.FULL_COUNTS_FILE))
  np.testing.assert_array_equal(counts, sparsity.training_counts(full))
  assert prepare.load_summary(str(tmp_path / "half"))["train_fraction"] == 0.5
  # Another fraction on the same folder prepares it again.
  again = prepare.prepare_or_load("synthetic", None, str(tmp_path / "half"), train_fraction=1.0)
  assert [s.tolist() for s in again.sequences] == [s.tolist() for s in full.sequences]
  assert not os.path.exists(os.path.join(prepare.prepared_dir(str(tmp_path / "half")),
                                         sparsity.FULL_COUNTS_FILE))
  with pytest.raises(ValueError, match="train_fraction"):
    prepare.prepare_or_load("synthetic", None, str(tmp_path / "bad"), train_fraction=0.0)
