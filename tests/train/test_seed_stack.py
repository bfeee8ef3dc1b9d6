"""Seeds trained together equal seeds trained alone: the first steps to 1e-5, whole runs
(early stopping per seed, best epoch, saved best parameters, test metrics) seed by seed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from planted import planted_dataset
from slim_jax import sharding
from slim_jax.data import sequences
from slim_jax.recommenders import registry
from slim_jax.train import loop, seed_stack, steps
from slim_jax.train import state as state_lib
from slim_jax.train.checkpoints import Checkpointer

SEEDS = (0, 1, 2)


def _model(data, name="sasrec"):
  return registry.make_recommender(name, num_items=data.num_items, max_len=10,
                                   hidden_size=16, dropout=0.2)


def test_first_steps_of_the_stack_equal_each_seed_alone():
  data = planted_dataset(num_users=48, num_items=60)
  model, tx, mesh = _model(data), optax.adam(1e-2), sharding.make_mesh("")
  example = lambda: (jnp.zeros((16, 10), jnp.int32), jnp.zeros((16,), jnp.int32))  # noqa: E731
  body = steps.train_step_fn(model, tx, "bce")
  alone, states, rngs, batches = [], [], [], []
  step = None
  for seed in SEEDS:
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    state, shardings = state_lib.create_train_state(model, tx, example, init_rng, mesh)
    step = step or steps.make_train_step(model, tx, "bce", mesh, shardings)
    seed_batches = [{k: b[k] for k in steps.TRAIN_BATCH_RANKS} for b in
                    sequences.TrainBatcher(data, 10, 16, seed).epoch(0)][:4]
    states.append(jax.device_get(state))
    rngs.append(train_rng)
    batches.append(seed_batches)
    for batch in seed_batches:
      state, _ = step(state, batch, train_rng)
    alone.append(jax.device_get(state.params))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  vstep = jax.jit(jax.vmap(body))
  for t in range(4):
    batch = {k: np.stack([batches[s][t][k] for s in range(len(SEEDS))])
             for k in steps.TRAIN_BATCH_RANKS}
    stacked, _ = vstep(stacked, batch, jnp.stack(rngs))
  for s in range(len(SEEDS)):
    jax.tree.map(lambda a, b, s=s: np.testing.assert_allclose(b[s], a, rtol=1e-5, atol=1e-5),
                 alone[s], jax.device_get(stacked.params))
  # The seeds really differ (a stack that trained one seed three times would fail above).
  assert not np.allclose(alone[0]["backbone"]["item_embedding"]["embedding"],
                         alone[1]["backbone"]["item_embedding"]["embedding"])


# patience 20 (no seed stops) is slow-marked: the fast suite sat at 30 minutes with it.
@pytest.mark.parametrize("patience", [1, pytest.param(20, marks=pytest.mark.slow)])
def test_whole_runs_equal_each_seed_alone(tmp_path, patience):
  """patience 1: seeds stop at different epochs, the stack shrinks; 20: none stops early."""
  data = planted_dataset(num_users=64, num_items=80, seed=1)
  negatives = sequences.sample_eval_negatives(data, 40, seed=0)
  model = _model(data, "gru4rec")
  config = loop.TrainConfig(loss="bce", epochs=6, batch_size=16, learning_rate=3e-2,
                            patience=patience, eval_batch_size=32, max_len=10,
                            progress=False)
  alone = [loop.train_and_evaluate(model, data, negatives, dataclasses.replace(config, seed=s),
                                   str(tmp_path / f"alone_{s}"), log=lambda _: None)
           for s in SEEDS]
  dirs = [str(tmp_path / f"stack_{s}") for s in SEEDS]
  logs = []
  together = seed_stack.train_and_evaluate_seeds(model, data, negatives, config, SEEDS, dirs,
                                                 log=logs.append)
  runs = [r["epochs_run"] for r in alone]
  if patience == 1:
    assert len(set(runs)) > 1, f"every seed ran {runs} epochs: the shrinking is untested"
  else:
    assert runs == [6, 6, 6]
  assert len(logs) == sum(runs)
  for a, b, d in zip(alone, together, dirs):
    assert (b["seed"], b["best_epoch"], b["epochs_run"]) == (a["seed"], a["best_epoch"],
                                                             a["epochs_run"])
    for ha, hb in zip(a["history"], b["history"]):
      assert ha.keys() == hb.keys()
      for k in ha:
        np.testing.assert_allclose(hb[k], ha[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for k in a["test"]:
      np.testing.assert_allclose(b["test"][k], a["test"][k], rtol=1e-4, atol=1e-5)
    with Checkpointer(f"{d}/checkpoints", best_metric="valid/ndcg@10") as ckpt:
      params, meta = ckpt.restore(None, step="best")
    assert meta["epoch"] == a["best_epoch"] and meta["config"]["seed"] == a["seed"]
    with Checkpointer(f"{tmp_path}/alone_{a['seed']}/checkpoints",
                      best_metric="valid/ndcg@10") as ckpt:
      reference, _ = ckpt.restore(None, step="best")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4),
                 params, reference)


def test_bad_seed_lists_are_refused(tmp_path):
  data = planted_dataset(num_users=16, num_items=30)
  config = loop.TrainConfig(batch_size=8, eval_batch_size=8, max_len=10, progress=False)
  with pytest.raises(ValueError, match="distinct seeds"):
    seed_stack.train_and_evaluate_seeds(_model(data), data, {}, config, (0, 0),
                                        [str(tmp_path)] * 2)
