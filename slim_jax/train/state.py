"""The recommender train state: a small explicit pytree, created already sharded.

`TrainState(step, params, opt_state)` holds arrays only; the model and the optimizer are
passed to the step functions separately (they are static). `create_train_state` derives
every leaf's sharding from the logical axis names the model gives its parameters
(`jax.eval_shape` of the initialiser, then slim_jax/sharding.py's rules), and runs the
initialiser under `jit(out_shardings=...)` so the state is born on its devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.core import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slim_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: optimizer updates done
  params: Any
  opt_state: Any


def _boxed_state(model: nn.Module, tx: optax.GradientTransformation,
                 init_args: Callable[[], tuple], rng: jax.Array) -> TrainState:
  # Boxed (LogicallyPartitioned) params: optax's tree maps keep the boxes, so the
  # optimizer state carries the same logical names as the parameters it mirrors.
  params = model.init(rng, *init_args())["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model: nn.Module, tx: optax.GradientTransformation,
                    init_args: Callable[[], tuple], mesh: Mesh, rules=sharding.DEFAULT_RULES):
  """NamedShardings for every leaf of the (unboxed) TrainState."""
  abstract = jax.eval_shape(lambda r: _boxed_state(model, tx, init_args, r),
                            jax.random.PRNGKey(0))
  return sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       init_args: Callable[[], tuple], rng: jax.Array, mesh: Mesh,
                       rules=sharding.DEFAULT_RULES) -> tuple[TrainState, Any]:
  """Returns (state, shardings): the initialised state placed by the logical rules.

  `init_args()` returns the example inputs of `model.init` (after the rng), e.g.
  `lambda: (jnp.zeros((B, L), jnp.int32),)`; shapes matter, values do not.
  """
  shardings = state_shardings(model, tx, init_args, mesh, rules)
  init = jax.jit(lambda r: meta.unbox(_boxed_state(model, tx, init_args, r)),
                 out_shardings=shardings)
  return init(rng), shardings


def create_stacked_train_states(model: nn.Module, tx: optax.GradientTransformation,
                                init_args: Callable[[], tuple], rngs: jax.Array, mesh: Mesh,
                                rules=sharding.DEFAULT_RULES) -> tuple[TrainState, Any]:
  """`create_train_state` for each key of `rngs` [S, 2] at once (one compilation): every
  leaf gets a leading seed axis [S, ...], unsplit; seed s's values are those
  `create_train_state(..., rngs[s], ...)` draws. Returns (state, its shardings)."""
  one = state_shardings(model, tx, init_args, mesh, rules)
  stacked = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(None, *s.spec)), one)
  init = jax.jit(jax.vmap(lambda r: meta.unbox(_boxed_state(model, tx, init_args, r))),
                 out_shardings=stacked)
  return init(rngs), stacked
