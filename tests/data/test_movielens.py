"""MovieLens-100k: the real files from the recbole wheel, and small fixtures in its format."""

import os

import numpy as np
import pytest

from slim_jax.data import movielens
from slim_jax.data import prepare
from slim_jax.data import raw
from slim_jax.data import sequences

_REAL = movielens.default_data_dir()
_HAVE_REAL = all(os.path.exists(os.path.join(_REAL, f))
                 for f in (movielens.INTER_FILE, movielens.ITEM_FILE))


@pytest.mark.skipif(not _HAVE_REAL, reason=f"MovieLens-100k is not in the cache ({_REAL}); "
                    "run `bash scripts/setup.sh` to fetch it")
def test_real_movielens_100k(tmp_path):
  data = movielens.load()
  assert len(data.log) == 100_000
  assert len(data.log.users) == 943 and len(data.log.items) == 1682
  full, summary = prepare.build(data, core=0, name="ml-100k")
  assert (full.num_users, full.num_items, full.num_interactions) == (943, 1682, 100_000)
  toy = full.item(1)
  assert toy.raw_id == "1" and toy.title == "Toy Story"
  assert toy.text == "Title: Toy Story; Year: 1995; Genres: Animation, Children's, Comedy"
  for ts in full.timestamps:
    assert (np.diff(ts) >= 0).all()

  # The default keeps everything, as RecBole does with ml-100k.
  ds = prepare.prepare_or_load("ml-100k", None, str(tmp_path / "default"))
  summary = prepare.load_summary(str(tmp_path / "default"))
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100_000)
  assert summary["core"] == 0 and summary["lines_skipped"]["total"] == 0
  assert summary["duplicates_removed"] == 0
  negs = sequences.load_negatives(prepare.prepared_dir(str(tmp_path / "default")))
  assert negs["test"].shape == (943, 100)

  ds = prepare.prepare_or_load("ml-100k", None, str(tmp_path / "five"), core=5)
  summary = prepare.load_summary(str(tmp_path / "five"))
  assert summary["before_filtering"] == {"users": 943, "items": 1682, "interactions": 100_000}
  # Every user has >= 20 ratings; 5-core drops the rarely rated movies (one round).
  assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1349, 99_287)
  assert summary["core_rounds"] == 1


def _write(folder, inter_lines, item_lines=("1\tA Movie\t1995\tDrama Comedy",)):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "ml-100k.inter"), "w") as f:
    f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    f.write("".join(line + "\n" for line in inter_lines))
  with open(os.path.join(folder, "ml-100k.item"), "w") as f:
    f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
    f.write("".join(line + "\n" for line in item_lines))
  return folder


def test_fixture_load_and_bad_lines(tmp_path):
  lines = ["1\t1\t5\t30", "1\t2\t3\t10", "1\t3\t4\t20", "2\tbroken", "2\t1\t2\tnoon"]
  folder = _write(str(tmp_path), lines, ["1\tA Movie\t1995\tDrama Comedy",
                                         "2\tNo Year\t\tunknown", "3\tThird\t1990\tWar"])
  with pytest.raises(raw.MalformedLineError, match=r"ml-100k\.inter:5: "):
    movielens.load(folder)
  data = movielens.load(folder, skip_bad_lines=True)
  ds, summary = prepare.build(data, core=0)
  assert summary["lines_skipped"]["total"] == 2
  assert [ds.item(i).raw_id for i in ds.sequences[0]] == ["2", "3", "1"]
  assert ds.item(1).text == "Title: A Movie; Year: 1995; Genres: Drama, Comedy"
  assert ds.item(2).text == "Title: No Year"  # no year, 'unknown' genre left out
  assert ds.item(1).brand == "" and ds.item(1).categories == ("Drama", "Comedy")


def test_missing_cache_says_how_to_fetch(tmp_path):
  with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
    movielens.load(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="ml-100k.inter"):
    prepare.prepare_or_load("ml-100k", str(tmp_path / "empty"), str(tmp_path / "run"))


def test_fetch_extracts_from_a_cached_wheel(tmp_path):
  wheel = os.path.join(movielens.cache_dir(), "wheels", movielens.WHEEL_NAME)
  if not os.path.exists(wheel):
    pytest.skip(f"no cached recbole wheel at {wheel}; run `bash scripts/setup.sh`")
  cache = tmp_path / "cache"
  os.makedirs(cache / "wheels")
  os.symlink(wheel, cache / "wheels" / movielens.WHEEL_NAME)  # no download needed
  target = movielens.fetch(str(cache))
  assert sorted(os.listdir(target)) == ["ml-100k.inter", "ml-100k.item"]
  assert os.path.getsize(os.path.join(target, "ml-100k.inter")) == 1_979_230


@pytest.mark.skipif(not _HAVE_REAL, reason=f"MovieLens-100k is not in the cache ({_REAL}); "
                    "run `bash scripts/setup.sh` to fetch it")
def test_no_leakage_on_real_movielens(tmp_path):
  ds = prepare.prepare_or_load("ml-100k", None, str(tmp_path))
  negs = sequences.load_negatives(prepare.prepared_dir(str(tmp_path)))
  owned = [set(s.tolist()) for s in ds.sequences]
  for split in ("valid", "test"):
    for u, row in enumerate(negs[split]):
      assert not owned[u].intersection(row.tolist())
  trained = [set(ds.train_prefix(u).tolist()) for u in range(ds.num_users)]
  held_out = np.stack([s[-2:] for s in ds.sequences])  # [U, 2] valid, test
  batcher = sequences.TrainBatcher(ds, 50, 256, seed=0)
  positions = 0
  for batch in batcher.epoch(0):
    rows_held_out = held_out[batch["users"]][:, None, :]  # [B, 1, 2]
    for key in ("inputs", "targets"):
      hit = batch[key][:, :, None] == rows_held_out  # [B, L, 2]
      assert not (hit & (batch["targets"] > 0)[:, :, None]).any(), key
    negatives = batch["negatives"]
    for row in range(len(negatives)):  # never an item the model may see in training
      assert not trained[batch["users"][row]].intersection(negatives[row][negatives[row] > 0])
    positions += int((batch["targets"] > 0).sum())
  assert positions == batcher.num_transitions == 100_000 - 3 * 943
