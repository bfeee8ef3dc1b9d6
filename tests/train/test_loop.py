"""Train steps and the training loop: losses, one compilation, sharding, learning, restore."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from planted import planted_dataset
from slim_jax import sharding
from slim_jax.data import sequences
from slim_jax.recommenders import registry
from slim_jax.train import loop, state as state_lib, steps


def test_bce_loss_hand_computed():
  seq = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])  # [1, 2, 2]
  items = jnp.array([[9.0, 9.0], [1.0, 1.0], [2.0, -1.0]])
  targets = jnp.array([[1, 0]])  # second position carries no loss
  negatives = jnp.array([[2, 1]])
  # position 0: pos score 1, neg score 2
  expected = -np.log(1 / (1 + np.exp(-1.0))) - np.log(1 - 1 / (1 + np.exp(-2.0)))
  np.testing.assert_allclose(steps.bce_loss(seq, items, targets, negatives), expected, rtol=1e-6)


def test_ce_loss_excludes_padding_item():
  seq = jnp.array([[[1.0, 0.0]]])
  items = jnp.array([[100.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # row 0 would dominate
  logits = np.array([1.0, 0.0])
  expected = -(logits[0] - np.log(np.exp(logits).sum()))
  np.testing.assert_allclose(steps.ce_loss(seq, items, jnp.array([[1]])), expected, rtol=1e-6)


@pytest.mark.parametrize("name,loss", [("sasrec", "bce"), ("srgnn", "ce")])
def test_train_step_compiles_once_and_shards_data(name, loss):
  data = planted_dataset(num_users=40, num_items=50)
  mesh = sharding.make_mesh("data=8")
  model = registry.make_recommender(name, num_items=data.num_items, max_len=10, hidden_size=16)
  tx = optax.adam(1e-2)
  example = lambda: (jnp.zeros((16, 10), jnp.int32), jnp.zeros((16,), jnp.int32))
  state, shardings = state_lib.create_train_state(model, tx, example, jax.random.PRNGKey(0),
                                                  mesh)
  train_step = steps.make_train_step(model, tx, loss, mesh, shardings)
  batcher = sequences.TrainBatcher(data, 10, 16, seed=0)
  losses = []
  for epoch in range(3):
    for batch in batcher.epoch(epoch):
      state, m = train_step(state, {k: batch[k] for k in steps.TRAIN_BATCH_RANKS},
                            jax.random.PRNGKey(1))
      losses.append(float(m["loss"]))
  assert train_step._cache_size() == 1  # fixed shapes: one compilation for all steps
  assert int(state.step) == 3 * batcher.num_batches
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  emb = state.params["backbone"]["item_embedding"]["embedding"]
  assert emb.sharding.is_fully_replicated and len(emb.sharding.device_set) == 8


def test_evaluate_is_independent_of_batch_size():
  data = planted_dataset(num_users=37, num_items=120)
  negatives = sequences.sample_eval_negatives(data, 100, seed=0)
  eval_set = sequences.eval_set(data, "test", negatives, 10)
  mesh = sharding.make_mesh("data=8")
  model = registry.make_recommender("gru4rec", num_items=data.num_items, max_len=10,
                                    hidden_size=16)
  tx = optax.adam(1e-3)
  example = lambda: (jnp.zeros((8, 10), jnp.int32), jnp.zeros((8,), jnp.int32))
  state, shardings = state_lib.create_train_state(model, tx, example, jax.random.PRNGKey(0),
                                                  mesh)
  fns = steps.make_eval_fns(model, mesh, shardings.params)
  for mode in ("sampled", "full"):
    small = loop.evaluate(fns, state.params, eval_set, batch_size=8, mode=mode,
                          num_items=data.num_items)
    large = loop.evaluate(fns, state.params, eval_set, batch_size=64, mode=mode,
                          num_items=data.num_items)
    for k in small:
      np.testing.assert_allclose(small[k], large[k], rtol=1e-6)
  assert fns[0]._cache_size() == 2  # one compilation per eval batch size, none per batch


def test_learns_planted_structure_and_restores_best(tmp_path):
  data = planted_dataset()
  negatives = sequences.sample_eval_negatives(data, 100, seed=0)
  model = registry.make_recommender("gru4rec", num_items=data.num_items, max_len=20,
                                    hidden_size=32, dropout=0.1)
  config = loop.TrainConfig(loss="ce", epochs=25, batch_size=32, learning_rate=1e-2,
                            patience=3, eval_batch_size=64, max_len=20, progress=False)
  logs = []
  result = loop.train_and_evaluate(model, data, negatives, config, str(tmp_path),
                                   log=logs.append)
  # Random ranking against 100 negatives: NDCG@10 about 0.045, HR@10 about 0.1.
  assert result["test"]["ndcg@10"] > 0.3, result["test"]
  assert result["valid"]["ndcg@10"] > 0.3
  assert 1 <= result["best_epoch"] <= result["epochs_run"] <= 25
  assert len(logs) == result["epochs_run"]
  best_valid = max(h["valid/ndcg@10"] for h in result["history"])
  assert result["valid"]["ndcg@10"] == best_valid


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="--loss"):
    loop.TrainConfig(loss="bpr")
  with pytest.raises(ValueError, match="--eval_mode"):
    loop.TrainConfig(eval_mode="all")
  with pytest.raises(ValueError, match="multiple of the 8"):
    loop.check_divisible(12, sharding.make_mesh("data=8"))
