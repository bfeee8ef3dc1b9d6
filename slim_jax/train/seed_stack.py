"""Every seed of one recommender trained at once: one jitted program steps all seeds.

`train_and_evaluate_seeds(model, dataset, negatives, config, seeds, workdirs)` returns, per
seed, what `loop.train_and_evaluate` returns for `dataclasses.replace(config, seed=s)`, to
float rounding: the parameters and Adam states of the seeds are stacked on a leading axis
[S, ...] and the train step of slim_jax/train/steps.py is vmapped over it, with each seed's
own initialisation, data order and negatives (`TrainBatcher(seed=s)`) and dropout keys.
Validation scores every seed's parameters on the same users in one vmapped call.

Early stopping stays per seed: a seed whose patience runs out is frozen (its row keeps
its state) and, once at most half of the rows still train, the stopped rows are dropped
(the step recompiles for the smaller stack: at most log2(S) times). Each seed's best
parameters are kept on the host. At the end each seed's best
parameters are saved to `<workdir>/checkpoints/` exactly as the one-seed loop saves them
(grid.restore_best reads them) and scored on the test users: the mean metrics, each
user's (`test_per_user`, {metric: [U]}) and each user's top-10 unseen items (`test_top`
[U, analysis.TOP_K], for the popularity analysis), all seeds in one vmapped program.

One process only (the grid's case); a mesh still splits each batch over its devices.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from slim_jax import analysis, sharding
from slim_jax.data import sequences
from slim_jax.data.dataset import SequenceDataset
from slim_jax.recommenders import backbone
from slim_jax.train import loop
from slim_jax.train import state as state_lib
from slim_jax.train import steps
from slim_jax.train.checkpoints import Checkpointer


def _rows(tree: Any, rows: Sequence[int]) -> Any:
  """The seeds `rows` of a stacked pytree, on the host (no per-shape compilation)."""
  index = np.asarray(rows)
  return jax.tree.map(lambda x: np.asarray(x)[index], jax.device_get(tree))


def train_and_evaluate_seeds(model: nn.Module, dataset: SequenceDataset, negatives: dict,
                             config: loop.TrainConfig, seeds: Sequence[int],
                             workdirs: Sequence[str], *, name: str = "model",
                             log=print) -> list[dict[str, Any]]:
  """Trains `model` once per seed (config.seed is ignored) and returns their results in
  `seeds` order; seed s writes `workdirs[i]/checkpoints/` (its best parameters)."""
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds) or len(workdirs) != len(seeds):
    raise ValueError(f"need distinct seeds and one workdir each, got {seeds} and "
                     f"{len(workdirs)} workdirs")
  if jax.process_count() > 1:
    raise ValueError("seed stacking runs in one process; on several hosts train each seed "
                     "with slim_jax/train/loop.py")
  mesh = sharding.make_mesh(config.mesh)
  loop.check_divisible(config.batch_size, mesh)
  loop.check_divisible(config.eval_batch_size, mesh, "--eval_batch_size")
  tx = optax.adam(config.learning_rate)
  example = lambda: (jnp.zeros((config.batch_size, config.max_len), jnp.int32),  # noqa: E731
                     jnp.zeros((config.batch_size,), jnp.int32))
  # Each seed's keys exactly as the one-seed loop splits them.
  keys = [jax.random.split(jax.random.PRNGKey(seed)) for seed in seeds]
  state, state_shardings = state_lib.create_stacked_train_states(
      model, tx, example, np.stack([np.asarray(k[0]) for k in keys]), mesh)  # [S, ...]
  rngs = np.stack([np.asarray(k[1]) for k in keys])  # [S, 2] dropout keys
  batch_shardings = {k: NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"),
                                                          *([None] * (rank - 1))))
                     for k, rank in steps.TRAIN_BATCH_RANKS.items()}
  replicated = sharding.replicated(mesh)
  step = steps.train_step_fn(model, tx, config.loss)

  def masked_step(state, batch, rng, live):
    """One seed's step; a seed that stopped (live False) keeps its state."""
    new, step_metrics = step(state, batch, rng)
    return jax.tree.map(lambda a, b: jnp.where(live, a, b), new, state), step_metrics

  train_step = jax.jit(jax.vmap(masked_step),
                       in_shardings=(state_shardings, batch_shardings, replicated, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  sampled_fn, full_fn = steps.eval_step_fns(model)
  b1, b2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
  per_seed = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))
  params_shardings = state_shardings.params
  eval_fns = (
      jax.jit(jax.vmap(sampled_fn, in_axes=(0, None, None, None, None)),
              in_shardings=(params_shardings, b2, b1, b2, b2), out_shardings=per_seed),
      jax.jit(jax.vmap(full_fn, in_axes=(0, None, None, None, None, None)),
              in_shardings=(params_shardings, b2, b1, b2, b1, b2), out_shardings=per_seed))

  batchers = [sequences.TrainBatcher(dataset, config.max_len, config.batch_size, s)
              for s in seeds]
  valid_set = sequences.eval_set(dataset, "valid", negatives, config.max_len)
  test_set = sequences.eval_set(dataset, "test", negatives, config.max_len)
  eval_kwargs = dict(batch_size=config.eval_batch_size, mode=config.eval_mode,
                     num_items=dataset.num_items, mesh=mesh)

  n = len(seeds)
  rows = list(range(n))  # the seed (index into `seeds`) of each row of `state`
  running = set(rows)  # seeds still training
  best_value, best_epoch, bad_epochs = [-1.0] * n, [-1] * n, [0] * n
  best_valid: list[dict] = [{} for _ in range(n)]
  best_params: list[Any] = [None] * n
  history: list[list[dict]] = [[] for _ in range(n)]
  time_to_best = [0.0] * n
  start = time.perf_counter()
  train_seconds = 0.0
  for epoch in range(config.epochs):
    epoch_start = time.perf_counter()
    live = [r for r, i in enumerate(rows) if i in running]  # rows that train this epoch
    mask = np.isin(np.arange(len(rows)), live)  # [S_rows]; the others stay frozen
    losses = []
    for parts in zip(*(batchers[rows[r]].epoch(epoch) for r in live)):
      by_row = dict(zip(live, parts))  # a frozen row computes on a live row's batch
      batch = jax.device_put({k: np.stack([by_row.get(r, parts[0])[k]
                                           for r in range(len(rows))])
                              for k in steps.TRAIN_BATCH_RANKS}, batch_shardings)
      state, step_metrics = train_step(state, batch, rngs, mask)
      losses.append(step_metrics["loss"])  # [S_rows]
    train_loss = np.mean(np.stack(jax.device_get(losses)), axis=0)  # [S_rows]
    train_seconds += time.perf_counter() - epoch_start
    valid = {k: v.mean(-1) for k, v in loop.evaluate_per_example(
        eval_fns, state.params, valid_set, **eval_kwargs).items()}  # {metric: [S_rows]}
    host_params = None
    for row in live:
      i = rows[row]
      metrics = {k: float(v[row]) for k, v in valid.items()}
      history[i].append({"epoch": epoch + 1, "train_loss": float(train_loss[row]),
                         **{f"valid/{k}": v for k, v in metrics.items()}})
      improved = metrics[loop.SELECTION_METRIC] > best_value[i]
      log(f"{name}/{seeds[i]} epoch {epoch + 1}: loss {train_loss[row]:.4f}  valid "
          + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + ("  *" if improved else ""))
      if improved:
        best_value[i], best_epoch[i], best_valid[i] = (metrics[loop.SELECTION_METRIC],
                                                       epoch + 1, metrics)
        bad_epochs[i] = 0
        time_to_best[i] = time.perf_counter() - start
        host_params = host_params or jax.device_get(state.params)
        best_params[i] = jax.tree.map(lambda x, r=row: np.array(x[r]), host_params)
      else:
        bad_epochs[i] += 1
        if bad_epochs[i] >= config.patience:
          running.discard(i)
    if not running:
      break
    # Shrinking recompiles the step (seconds on a CPU), so it waits until at most half
    # of the rows still train: at most log2(S) recompilations; until then frozen rows
    # ride along.
    if len(running) <= len(rows) // 2:
      keep = [r for r, i in enumerate(rows) if i in running]
      rows = [rows[r] for r in keep]
      state = jax.device_put(_rows(state, keep), state_shardings)
      rngs = rngs[np.asarray(keep)]
  total_seconds = time.perf_counter() - start

  for i, seed in enumerate(seeds):
    seed_config = dataclasses.replace(config, seed=seed)
    with Checkpointer(os.path.join(workdirs[i], "checkpoints"), max_to_keep=1,
                      best_metric=f"valid/{loop.SELECTION_METRIC}") as ckpt:
      ckpt.save(best_epoch[i], best_params[i],
                metadata={"epoch": best_epoch[i], "valid": best_valid[i],
                          "config": dataclasses.asdict(seed_config)},
                metrics={f"valid/{loop.SELECTION_METRIC}": best_value[i]})
  best = jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *best_params), params_shardings)
  test = loop.evaluate_per_example(eval_fns, best, test_set, **eval_kwargs)  # {m: [S, U]}
  top = _top_items(model, best, test_set, dataset.num_items, config.eval_batch_size, mesh,
                   params_shardings)  # [S, U, k]
  return [{"seed": seed, "best_epoch": best_epoch[i], "epochs_run": len(history[i]),
           "valid": best_valid[i], "test": {k: float(v[i].mean()) for k, v in test.items()},
           "history": history[i], "test_per_user": {k: v[i] for k, v in test.items()},
           "test_top": top[i],
           "stacked_seeds": n, "train_seconds": train_seconds,
           "seconds_per_epoch": train_seconds / max(len(h) for h in history),
           "time_to_best_seconds": time_to_best[i], "total_seconds": total_seconds}
          for i, seed in enumerate(seeds)]


def _top_items(model: nn.Module, params: Any, test_set: sequences.EvalSet, num_items: int,
               batch_size: int, mesh, params_shardings: Any, k: int = analysis.TOP_K) -> np.ndarray:
  """[S, U, k]: each seed's top-k over the items each test user has not seen (the
  popularity analysis reads their head share), in fixed-size batches: one compilation."""

  def top(p, inputs, users, lengths, exclude):
    reps = model.apply({"params": p}, inputs, users, lengths, deterministic=True,
                       all_positions=False)
    scores = jnp.where(exclude, -jnp.inf, backbone.score_all(reps.sequence, reps.items))
    return jax.lax.top_k(scores, k)[1]  # [B, k]

  b1, b2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
  fn = jax.jit(jax.vmap(top, in_axes=(0, None, None, None, None)),
               in_shardings=(params_shardings, b2, b1, b2, b2),
               out_shardings=NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None)))
  arrays = {"inputs": np.asarray(test_set.inputs, np.int32),
            "users": np.asarray(test_set.users, np.int32),
            "lengths": np.asarray(test_set.lengths, np.int32)}
  parts, offset = [], 0
  for batch, real in loop._padded_batches(arrays, batch_size):  # pylint: disable=protected-access
    exclude = np.ones((batch_size, num_items + 1), bool)
    exclude[:real] = test_set.exclude_mask(num_items, offset, offset + real)
    out = fn(params, batch["inputs"], batch["users"], batch["lengths"], exclude)
    parts.append(np.asarray(jax.device_get(out))[:, :real])
    offset += real
  return np.concatenate(parts, axis=1)
