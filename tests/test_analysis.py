"""slim_jax/analysis.py: thinning, head items, cold users, per-user metrics and top-10."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
from planted import planted_dataset  # noqa: E402
from slim_jax import analysis, sharding  # noqa: E402
from slim_jax.data import sequences  # noqa: E402
from slim_jax.recommenders import slim  # noqa: E402
from slim_jax.train import loop, steps  # noqa: E402


def test_thin_training_keeps_targets_order_and_fraction():
  data = planted_dataset(num_users=40, num_items=60)
  thin = analysis.thin_training(data, 0.5, seed=3)
  for full, part, times in zip(data.sequences, thin.sequences, thin.timestamps):
    assert list(part[-2:]) == list(full[-2:])  # valid and test targets stay
    assert len(part) - 2 == max(1, round(0.5 * (len(full) - 2)))
    assert set(part[:-2]) <= set(full[:-2])
    assert np.all(np.diff(times) >= 0)  # still in time order
  assert analysis.thin_training(data, 1.0).sequences[0].tolist() == data.sequences[0].tolist()
  with pytest.raises(ValueError, match="train_fraction"):
    analysis.thin_training(data, 0.0)


def test_head_items_and_cold_users():
  counts = np.asarray([0, 5, 1, 9, 0, 3, 7, 2, 2, 4, 6])  # items 1..10
  head = analysis.head_items(counts, share=0.3)
  assert np.flatnonzero(head).tolist() == [3, 6, 10]
  data = planted_dataset(num_users=30, num_items=40)
  counts = analysis.training_counts(data)
  assert counts.sum() == sum(len(s) - 2 for s in data.sequences)
  cold = analysis.cold_users(data, counts, max_count=2)
  for u in range(data.num_users):
    assert (u in cold) == (counts[data.test_target(u)] <= 2)


def test_user_analysis_matches_the_training_loop_and_excludes_seen_items():
  data = planted_dataset(num_users=50, num_items=70)
  rng = np.random.default_rng(0)
  items = rng.normal(size=(data.num_items + 1, 16)).astype(np.float32)
  items[0] = 0
  model = slim.make_model("backbone+", "sasrec", num_items=data.num_items, item_text=items,
                          max_len=12, hidden_size=16, num_layers=1, num_heads=2)
  test = sequences.eval_set(data, "test", sequences.sample_eval_negatives(data, 30, seed=0), 12)
  params = model.init(jax.random.PRNGKey(0), test.inputs[:2], test.users[:2])["params"]
  per_user = analysis.user_analysis(model, params, test, data.num_items, batch_size=16)

  mesh = sharding.make_mesh("")
  reference = loop.evaluate(steps.make_eval_fns(model, mesh, None), params, test,
                            batch_size=16, mode="sampled", num_items=data.num_items)
  for name, value in reference.items():
    np.testing.assert_allclose(per_user[name].mean(), value, rtol=1e-5)
  top = per_user["top"]
  assert top.shape == (data.num_users, analysis.TOP_K)
  for u in range(data.num_users):
    assert not set(top[u].tolist()) & set(test.seen[u].tolist())
    assert 0 not in top[u]

