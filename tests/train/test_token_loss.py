"""Chunked next-token loss: equal to the full-logits cross-entropy, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slim_jax.train import token_loss


@pytest.mark.parametrize("chunk", [5, 16, 64])  # uneven (padded last block), exact, one block
def test_chunked_nll_equals_full_cross_entropy(chunk):
  b, t, d, v = 2, 8, 12, 37
  hidden = jax.random.normal(jax.random.key(0), (b, t, d))
  head = jax.random.normal(jax.random.key(1), (d, v))
  targets = jax.random.randint(jax.random.key(2), (b, t), 0, v)
  mask = (jax.random.uniform(jax.random.key(3), (b, t)) > 0.3).astype(jnp.float32)

  def full(hidden, head):
    logits = hidden @ head
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * mask)

  def chunked(hidden, head):
    total, count = token_loss.chunked_nll(hidden, head, targets, mask, jnp.float32, chunk=chunk)
    assert count.shape == ()
    return total

  np.testing.assert_allclose(chunked(hidden, head), full(hidden, head), rtol=1e-5)
  _, count = token_loss.chunked_nll(hidden, head, targets, mask, jnp.float32, chunk=chunk)
  assert float(count) == float(mask.sum())
  g_full = jax.grad(full, argnums=(0, 1))(hidden, head)
  g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, head)
  for a, c in zip(g_full, g_chunk):
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5)
