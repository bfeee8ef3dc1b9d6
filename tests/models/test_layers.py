"""The shared Linear layer: plain projection, bias, LoRA from the `lora` collection, and the
mixed-precision matmul (bf16 operands, float32 accumulation) with its custom gradient."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from slim_jax.models.layers import Linear, matmul


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


def test_bfloat16_matmul_accumulates_in_float32_forward_and_backward():
  x = jax.random.normal(jax.random.key(0), (2, 3, 64))
  w = jax.random.normal(jax.random.key(1), (64, 48))

  c = jax.random.normal(jax.random.key(2), (2, 3, 48))

  def loss(x, w, dtype):
    y = matmul(x, w, dtype, jnp.float32)  # [2, 3, 48]
    return jnp.sum(y * c)

  ref_loss, (gx_ref, gw_ref) = jax.value_and_grad(loss, argnums=(0, 1))(x, w, jnp.float32)
  low_loss, (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1))(x, w, jnp.bfloat16)
  assert gx.dtype == jnp.float32 and gw.dtype == jnp.float32  # cotangents in the inputs' dtype
  # bf16 operands (8 mantissa bits, relative rounding <= 2^-9): errors well under 1%.
  for ref, low in ((gx_ref, gx), (gw_ref, gw)):
    scale = float(jnp.abs(ref).mean())
    assert 0 < float(jnp.abs(ref - low).mean()) < 0.01 * scale
  assert abs(float(ref_loss - low_loss)) < 0.01 * float(jnp.sum(jnp.abs(c)) * 8)
  # The products ran with float32 accumulation: the bf16 result equals a float32 matmul of
  # the bf16-rounded operands, not a bf16-accumulated one.
  xr, wr = x.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
  exact = jnp.einsum("...i,if->...f", xr, wr)
  np.testing.assert_allclose(matmul(x, w, jnp.bfloat16, jnp.float32), exact, rtol=1e-5,
                             atol=1e-4)
