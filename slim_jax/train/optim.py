"""Optimizer for fine-tuning: AdamW, linear warmup + cosine decay, clipping, accumulation.

`make_optimizer` builds the optax chain from a frozen `OptimConfig`. Gradient
accumulation happens inside the jitted step (`accumulate_gradients`): the batch is split
into microbatches that a `lax.scan` runs one after another, summing gradients, so one
step is one optimizer update on the whole batch with the memory of one microbatch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 2e-4  # peak, after warmup
  warmup_steps: int = 10
  total_steps: int = 100  # cosine decays from the end of warmup to here
  final_lr_fraction: float = 0.1  # learning rate at total_steps, as a fraction of peak
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = 1.0  # global gradient norm; None: no clipping

  def __post_init__(self):
    if self.total_steps < 1:
      raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps="
                       f"{self.total_steps}]")


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      decay_steps=max(config.total_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.final_lr_fraction)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
  parts = []
  if config.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                           eps=config.eps, weight_decay=config.weight_decay))
  return optax.chain(*parts)


def accumulate_gradients(
    loss_and_count: Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array]],
    params: Any, batch: dict, num_microbatches: int,
) -> tuple[jax.Array, jax.Array, Any]:
  """Summed loss, summed token count and summed gradient over microbatches.

  `loss_and_count(params, microbatch, index) -> (loss_sum, count)` (index: the
  microbatch's number, for per-microbatch randomness) returns a SUM over tokens, so that
  the caller divides once by the total count and the result does not depend on how the
  batch was split. Every array in `batch` has the batch axis first, divisible by
  `num_microbatches`. Row i of the batch goes to microbatch i % num_microbatches, which
  keeps each microbatch spread evenly over a batch-sharded mesh.
  """
  grad_fn = jax.value_and_grad(loss_and_count, has_aux=True)
  if num_microbatches == 1:
    (loss, count), grads = grad_fn(params, batch, jnp.zeros((), jnp.int32))
    return loss, count, grads

  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                       f"{num_microbatches} microbatches")
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)  # [A, B / A, ...]

  micro = jax.tree.map(split, batch)

  def body(carry, xs):
    loss, count, grads = carry
    mb, index = xs
    (l, c), g = grad_fn(params, mb, index)
    return (loss + l, count + c, jax.tree.map(jnp.add, grads, g)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, count, grads), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
      (micro, jnp.arange(num_microbatches, dtype=jnp.int32)))
  return loss, count, grads
