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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_a_frozen_head_gives_the_hidden_gradient_of_the_full_cross_entropy(chunk, dtype):
  b, t, d, v = 2, 8, 12, 37
  hidden = jax.random.normal(jax.random.key(0), (b, t, d)).astype(dtype)
  head = jax.random.normal(jax.random.key(1), (d, v)).astype(dtype)
  targets = jax.random.randint(jax.random.key(2), (b, t), 0, v)
  mask = (jax.random.uniform(jax.random.key(3), (b, t)) > 0.3).astype(jnp.float32)

  def full(hidden):
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)

  def frozen(hidden):
    return token_loss.chunked_nll(hidden, head, targets, mask, dtype, chunk=chunk,
                                  frozen_head=True)[0]

  value, grad = jax.jit(jax.value_and_grad(frozen))(hidden)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(value, full(hidden), rtol=tol)
  assert grad.dtype == hidden.dtype
  np.testing.assert_allclose(np.asarray(grad, np.float32),
                             np.asarray(jax.grad(full)(hidden), np.float32), rtol=tol, atol=tol)
  # Scaling the loss scales the gradient (the backward pass multiplies by its cotangent).
  half = jax.grad(lambda h: 0.5 * frozen(h))(hidden)
  np.testing.assert_allclose(np.asarray(half, np.float32), 0.5 * np.asarray(grad, np.float32),
                             rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6)
  # The head is frozen: its gradient is zero.
  head_grad = jax.grad(lambda w: token_loss.chunked_nll(hidden, w, targets, mask, dtype,
                                                        chunk=chunk, frozen_head=True)[0])(head)
  assert not np.any(np.asarray(head_grad, np.float32))
