"""The shared Linear layer: plain projection, bias, and LoRA from the `lora` collection."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from slim_jax.models.layers import Linear


def test_linear_matches_matmul_and_applies_lora():
  layer = Linear(features=5, axes=("embed", "mlp"), use_bias=True, lora_scale=2.0)
  x = jax.random.normal(jax.random.key(0), (3, 4))
  params = nn.unbox(layer.init(jax.random.key(1), x))["params"]
  params = {"kernel": params["kernel"], "bias": jnp.arange(5.0)}
  y = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, x @ params["kernel"] + params["bias"], atol=1e-6)

  a = jax.random.normal(jax.random.key(2), (4, 2))
  b = jax.random.normal(jax.random.key(3), (2, 5))
  y_lora = layer.apply({"params": params, "lora": {"a": a, "b": b}}, x)
  np.testing.assert_allclose(y_lora, y + 2.0 * (x @ a) @ b, atol=1e-5)
  assert not np.allclose(y_lora, y)
