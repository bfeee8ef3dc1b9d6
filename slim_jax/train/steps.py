"""Pure, jitted steps for sequential recommenders: one train step, two scoring functions.

  train_step(state, batch, rng) -> (state, {"loss", "grad_norm"})
  sampled(params, inputs, users, lengths, candidates) -> {metric: [B]}     100 stored negatives
  full(params, inputs, users, lengths, targets, exclude) -> {metric: [B]}  every unseen item

The model is any module with the `Recommender` call of slim_jax/recommenders/backbone.py:
`model.apply({'params': p}, inputs, users, lengths, deterministic=, all_positions=)` returns the
sequence vectors and the item table. Losses (per position t, target y_t, 0 = no loss):

  bce: -log sigmoid(<s_t, z_y>) - log(1 - sigmoid(<s_t, z_n>)), one sampled negative n per
       position (the paper's loss, SASRec's original);
  ce:  softmax cross-entropy over all items 1..V (RecBole's `loss_type: CE`).

Every batch has the same shapes, so each function compiles once. The batch is split over
the mesh's (data, fsdp) axes; parameters are placed by their logical axis names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from slim_jax import sharding
from slim_jax.recommenders import backbone
from slim_jax.train import metrics
from slim_jax.train.state import TrainState

LOSSES = ("bce", "ce")
# Batch keys the train step reads, with their ranks: inputs/targets/negatives/lengths [B, L]
# (lengths: the user's items each position's history holds), users [B].
TRAIN_BATCH_RANKS = {"inputs": 2, "targets": 2, "negatives": 2, "lengths": 2, "users": 1}


def bce_loss(sequence: jnp.ndarray, items: jnp.ndarray, targets: jnp.ndarray,
             negatives: jnp.ndarray) -> jnp.ndarray:
  """sequence [B, L, D], items [V+1, D], targets/negatives [B, L] -> mean over targets > 0."""
  pos = jnp.einsum("bld,bld->bl", sequence, jnp.take(items, targets, axis=0))
  neg = jnp.einsum("bld,bld->bl", sequence, jnp.take(items, negatives, axis=0))
  per_position = -jax.nn.log_sigmoid(pos) - jax.nn.log_sigmoid(-neg)  # [B, L]
  return _masked_mean(per_position, targets > 0)


def ce_loss(sequence: jnp.ndarray, items: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Full softmax over items 1..V (the padding row 0 is never a class)."""
  logits = backbone.score_all(sequence, items)  # [B, L, V+1]
  logits = jnp.where(jnp.arange(items.shape[0]) == 0, -1e9, logits)
  per_position = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
  return _masked_mean(per_position, targets > 0)


def _masked_mean(values: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def batch_shardings(mesh: Mesh, ranks: dict[str, int] = TRAIN_BATCH_RANKS) -> dict:
  return {key: sharding.batch_sharding(mesh, ndim) for key, ndim in ranks.items()}


def train_step_fn(model: nn.Module, tx: optax.GradientTransformation, loss: str) -> Callable:
  """The pure train step: (state, batch, rng) -> (state, {"loss", "grad_norm"}), for
  `make_train_step` (one model) and slim_jax/train/seed_stack.py (seeds vmapped)."""
  if loss not in LOSSES:
    raise ValueError(f"--loss={loss!r} is not one of {LOSSES}")

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      reps = model.apply({"params": params}, batch["inputs"], batch["users"], batch["lengths"],
                         deterministic=False, all_positions=True,
                         rngs={"dropout": dropout_rng})
      if loss == "bce":
        return bce_loss(reps.sequence, reps.items, batch["targets"], batch["negatives"])
      return ce_loss(reps.sequence, reps.items, batch["targets"])

    value, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, {"loss": value, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss: str,
                    mesh: Mesh, state_shardings: Any) -> Callable:
  """The jitted train step; the state is donated."""
  replicated = sharding.replicated(mesh)
  return jax.jit(train_step_fn(model, tx, loss),
                 in_shardings=(state_shardings, batch_shardings(mesh), replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))


def eval_step_fns(model: nn.Module) -> tuple[Callable, Callable]:
  """The pure (sampled, full) scoring functions of `make_eval_fns`."""

  def represent(params, inputs, users, lengths):
    return model.apply({"params": params}, inputs, users, lengths, deterministic=True,
                       all_positions=False)

  def sampled_fn(params, inputs, users, lengths, candidates):
    reps = represent(params, inputs, users, lengths)
    scores = backbone.score_candidates(reps.sequence, reps.items, candidates)  # [B, C]
    return metrics.sampled_ranking_metrics(scores)

  def full_fn(params, inputs, users, lengths, targets, exclude):
    reps = represent(params, inputs, users, lengths)
    scores = backbone.score_all(reps.sequence, reps.items)  # [B, V+1]
    return metrics.full_ranking_metrics(scores, targets, exclude)

  return sampled_fn, full_fn


def make_eval_fns(model: nn.Module, mesh: Mesh, params_shardings: Any
                  ) -> tuple[Callable, Callable]:
  """(sampled, full): jitted scoring plus per-example metrics, the batch split over the mesh.

  sampled(params, inputs [B, L], users [B], lengths [B, L], candidates [B, C]) -> {metric: [B]}
  full(params, inputs, users, lengths, targets [B], exclude [B, V+1]) -> {metric: [B]}
  """
  sampled_fn, full_fn = eval_step_fns(model)
  b1, b2 = sharding.batch_sharding(mesh, 1), sharding.batch_sharding(mesh, 2)
  sampled = jax.jit(sampled_fn, in_shardings=(params_shardings, b2, b1, b2, b2),
                    out_shardings=b1)
  full = jax.jit(full_fn, in_shardings=(params_shardings, b2, b1, b2, b1, b2), out_shardings=b1)
  return sampled, full
