"""Batches and evaluation candidates: shapes, coverage, determinism and no leakage."""

import time

import numpy as np
import pytest

from slim_jax.data import dataset as dataset_lib
from slim_jax.data import sequences


def _dataset(lengths, num_items, seed=0):
  """Users with distinct random items (no repeats, as after preparation)."""
  rng = np.random.default_rng(seed)
  seqs = [rng.choice(np.arange(1, num_items + 1), n, replace=False).astype(np.int32)
          for n in lengths]
  items = [dataset_lib.Item(i, f"r{i}", f"t{i}", "", (), f"t{i}")
           for i in range(1, num_items + 1)]
  return dataset_lib.SequenceDataset(
      items=items, user_raw_ids=[f"u{u}" for u in range(len(lengths))], sequences=seqs,
      timestamps=[np.arange(n, dtype=np.int64) for n in lengths], name="t")


def test_left_pad():
  out = sequences.left_pad([np.array([1, 2, 3]), np.array([], np.int32),
                            np.arange(1, 8)], 4)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, [[0, 1, 2, 3], [0, 0, 0, 0], [4, 5, 6, 7]])


def test_eval_negatives_never_hit_the_user_and_are_stored(tmp_path):
  ds = _dataset(np.random.default_rng(1).integers(3, 120, 300), num_items=400)
  negs = sequences.sample_eval_negatives(ds, 100, seed=3)
  for split in ("valid", "test"):
    assert negs[split].shape == (300, 100) and negs[split].dtype == np.int32
    for u, row in enumerate(negs[split]):
      assert len(np.unique(row)) == 100  # without replacement
      assert not np.isin(row, ds.sequences[u]).any()  # never a user's item
      assert row.min() >= 1 and row.max() <= 400
  assert not np.array_equal(negs["valid"], negs["test"])
  again = sequences.sample_eval_negatives(ds, 100, seed=3)
  np.testing.assert_array_equal(again["test"], negs["test"])
  sequences.save_negatives(str(tmp_path), negs)
  loaded = sequences.load_negatives(str(tmp_path))
  np.testing.assert_array_equal(loaded["valid"], negs["valid"])


def test_eval_negatives_are_uniform():
  # One user who owns items 1..10 of 30: every other item is equally likely.
  ds = _dataset([10], num_items=30)
  ds.sequences[0] = np.arange(1, 11, dtype=np.int32)
  counts = np.zeros(31)
  for seed in range(400):
    counts[sequences.sample_eval_negatives(ds, 5, seed)["test"][0]] += 1
  assert counts[:11].sum() == 0
  expected = 400 * 5 / 20
  assert np.all(np.abs(counts[11:] - expected) < 5 * np.sqrt(expected))


def test_too_few_items_for_negatives_is_explained():
  with pytest.raises(ValueError, match="lower num_negatives"):
    sequences.sample_eval_negatives(_dataset([20], num_items=100), 100)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_set(split):
  ds = _dataset([3, 8, 70], num_items=200)
  negs = sequences.sample_eval_negatives(ds, 100, seed=0)
  ev = sequences.eval_set(ds, split, negs, max_len=50)
  assert ev.inputs.shape == (3, 50) and ev.candidates.shape == (3, 101)
  cut = 2 if split == "valid" else 1
  for u, seq in enumerate(ds.sequences):
    history = seq[:-cut]
    assert ev.candidates[u, 0] == seq[-cut]
    np.testing.assert_array_equal(ev.candidates[u, 1:], negs[split][u])
    tail = history[-50:]
    np.testing.assert_array_equal(ev.inputs[u, 50 - len(tail):], tail)
    assert (ev.inputs[u, :50 - len(tail)] == 0).all()
    np.testing.assert_array_equal(np.sort(ev.seen[u]), np.sort(history))  # whole history
    assert ev.candidates[u, 0] not in ev.inputs[u]
  if split == "valid":  # the test item never shows up when validating
    for u, seq in enumerate(ds.sequences):
      assert seq[-1] not in ev.inputs[u]
  mask = ev.exclude_mask(ds.num_items, 1, 3)
  assert mask.shape == (2, 201) and mask[:, 0].all()
  assert mask[1].sum() == 1 + len(np.unique(ds.sequences[2][:-cut]))


def _collect(batcher, epoch):
  return list(batcher.epoch(epoch))


def test_train_batches_cover_every_transition_once_without_leakage():
  lengths = np.random.default_rng(2).integers(3, 140, 97)
  ds = _dataset(lengths, num_items=300)
  max_len, batch = 16, 8
  batcher = sequences.TrainBatcher(ds, max_len, batch, seed=5)
  batches = _collect(batcher, 0)
  assert len(batches) == batcher.num_batches
  seen = []
  for b in batches:
    for key in ("inputs", "targets", "negatives", "lengths"):
      assert b[key].shape == (batch, max_len) and b[key].dtype == np.int32
    assert b["users"].shape == (batch,)
    for row in range(batch):
      u = b["users"][row]
      mask = b["targets"][row] > 0
      if not mask.any():
        assert not b["inputs"][row].any() and not b["negatives"][row].any()
        continue
      prefix = ds.train_prefix(u)
      # Padding only in front; inputs and targets from the training prefix only.
      first = np.argmax(mask)
      assert mask[first:].all() and (b["inputs"][row, :first] == 0).all()
      assert np.isin(b["inputs"][row, first:], prefix).all()
      assert np.isin(b["targets"][row, first:], prefix).all()
      held_out = ds.sequences[u][-2:]
      assert not np.isin(b["inputs"][row], held_out).any()
      assert not np.isin(b["targets"][row], held_out).any()
      # Negatives: one per position, never an item of the user's training prefix.
      assert (b["negatives"][row, first:] > 0).all()
      assert not np.isin(b["negatives"][row], prefix).any()
      # Each target is the item that follows its input in the prefix; lengths count the
      # user's items up to the input (the causal rationale rule reads them).
      where = {item: k for k, item in enumerate(prefix)}
      assert (b["lengths"][row, :first] == 0).all()
      for x, y, n in zip(b["inputs"][row, first:], b["targets"][row, first:],
                         b["lengths"][row, first:]):
        assert where[y] == where[x] + 1 and n == where[x] + 1
        seen.append((u, where[x]))
  expected = [(u, t) for u in range(ds.num_users) for t in range(len(ds.train_prefix(u)) - 1)]
  assert sorted(seen) == sorted(expected)  # every transition exactly once
  assert batcher.num_transitions == len(expected)


def test_negatives_may_be_held_out_items():
  """Excluding the validation and test items from training negatives would tell the model
  they are the user's (issue 18, item 7): they are drawn like any unseen item."""
  ds = _dataset([12] * 40, num_items=14)  # few items: held-out ones get drawn often
  batcher = sequences.TrainBatcher(ds, 10, 40, seed=0)
  hits = 0
  for epoch in range(5):
    for b in batcher.epoch(epoch):
      for row, u in enumerate(b["users"]):
        hits += np.isin(b["negatives"][row], ds.sequences[u][-2:]).sum()
  assert hits > 0


def test_eval_lengths_count_the_whole_history():
  ds = _dataset([4, 70], num_items=100)
  negs = sequences.sample_eval_negatives(ds, 10, seed=0)
  test = sequences.eval_set(ds, "test", negs, max_len=50)
  assert test.lengths[0].tolist() == [0] * 47 + [1, 2, 3]  # test: prefix + valid item
  assert test.lengths[1, -1] == 69 and test.lengths[1, 0] == 20  # cut to the last 50


def test_windows_keep_the_recent_end_full():
  ds = _dataset([3 + 2 + 10], num_items=50)  # prefix of 13 items: 12 transitions
  batcher = sequences.TrainBatcher(ds, max_len=5, batch_size=4, seed=0)
  assert batcher.num_windows == 3 and batcher.num_batches == 1
  (b,) = _collect(batcher, 0)
  prefix = ds.train_prefix(0)
  rows = {tuple(r) for r in b["targets"].tolist()}
  assert tuple(prefix[8:13]) in rows  # the most recent window is full
  assert tuple(prefix[3:8]) in rows
  assert (0, 0, 0, *prefix[1:3]) in rows  # the oldest, partial window is padded
  assert (0, 0, 0, 0, 0) in rows  # padding row of the partial batch


def test_epochs_are_deterministic_and_differ():
  ds = _dataset(np.random.default_rng(3).integers(3, 60, 50), num_items=120)
  one = sequences.TrainBatcher(ds, 10, 16, seed=1)
  two = sequences.TrainBatcher(ds, 10, 16, seed=1)
  a, b, c = _collect(one, 0), _collect(two, 0), _collect(one, 1)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  other_seed = _collect(sequences.TrainBatcher(ds, 10, 16, seed=2), 0)
  assert not np.array_equal(a[0]["inputs"], other_seed[0]["inputs"])


def test_batcher_is_fast_at_movielens_scale():
  # ml-100k's shape: 943 users, ~106 items each, 1,682 items.
  lengths = np.random.default_rng(4).integers(20, 200, 943)
  ds = _dataset(lengths, num_items=1682)
  start = time.perf_counter()
  batcher = sequences.TrainBatcher(ds, 50, 256, seed=0)
  batches = _collect(batcher, 0)
  elapsed = time.perf_counter() - start
  assert sum(int((b["targets"] > 0).sum()) for b in batches) == batcher.num_transitions
  assert elapsed < 1.0, f"an epoch of batches took {elapsed:.2f}s"
