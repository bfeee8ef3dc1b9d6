"""The shared Linear layer: plain projection, bias, LoRA from the `lora` collection, and the
mixed-precision matmul (bf16 operands, float32 accumulation) with its custom gradient; the
dropout whose masks come from packed random bits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import pytest

from slim_jax.models.layers import Dropout, Linear, dropout_keep_mask, matmul


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


@pytest.mark.parametrize("rate,keep_prob", [(0.5, 0.5), (0.25, 0.75), (0.2, 1 - 13107 / 65536),
                                            (0.3, 1 - 19661 / 65536), (0.05, 1 - 3277 / 65536),
                                            (1e-5, 1 - 42950 / 2 ** 32),
                                            (0.99999, 1 - 4294924346 / 2 ** 32)])
def test_dropout_keeps_each_element_with_its_probability_independently(rate, keep_prob):
  keep, p = dropout_keep_mask(jax.random.key(0), (400, 50, 50), rate)  # 50: no whole words
  assert keep.shape == (400, 50, 50) and keep.dtype == jnp.bool_
  np.testing.assert_allclose(p, keep_prob, rtol=1e-12)
  keep = np.asarray(keep, np.float64)
  sigma = np.sqrt(p * (1 - p) / keep.size)
  assert abs(keep.mean() - p) < 5 * sigma + 1e-6  # tiny rates: 0 or 1 drop of 1e6 values
  # Fields of one word and of neighbouring words are independent: every position of the
  # last axis keeps at rate p, and neighbours are kept together at rate p^2.
  per_position = keep.reshape(-1, 50).mean(0)  # [50]
  assert np.all(np.abs(per_position - p) < 5 * np.sqrt(p * (1 - p) / (keep.size / 50)) + 1e-4)
  together = (keep[..., 1:] * keep[..., :-1]).mean()
  assert abs(together - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / keep[..., 1:].size) + 1e-6


def test_dropout_scales_kept_elements_and_passes_through_when_deterministic():
  x = jax.random.normal(jax.random.key(0), (64, 96)) + 3.0
  layer = Dropout(0.3)
  y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  _, p = dropout_keep_mask(jax.random.key(0), (1,), 0.3)
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / p, rtol=1e-6)
  assert 0.6 < kept.mean() < 0.8
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)
  np.testing.assert_array_equal(Dropout(1.0).apply({}, x, deterministic=False), 0 * x)
  other = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.array_equal(np.asarray(other) != 0, kept)


def test_bfloat16_dropout_scales_in_float32():
  x = jnp.full((4, 64), 3.0, jnp.bfloat16)
  y = Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  _, p = dropout_keep_mask(jax.random.key(0), (1,), 0.3)
  assert y.dtype == jnp.bfloat16
  kept = np.asarray(y, np.float32)[np.asarray(y, np.float32) != 0]
  np.testing.assert_array_equal(kept, np.float32(jnp.bfloat16(3.0 / p)))


def test_dropout_under_vmap_equals_each_key_alone():
  keys = jax.random.split(jax.random.key(3), 4)
  x = jnp.ones((4, 8, 50))
  apply = lambda k, v: Dropout(0.5).apply({}, v, deterministic=False,  # noqa: E731
                                          rngs={"dropout": k})
  stacked = jax.vmap(apply)(keys, x)
  for i in range(4):
    np.testing.assert_array_equal(stacked[i], apply(keys[i], x[i]))
