"""Attention with a written-out backward pass: equal to autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.models import attention


def _reference(q, key, value, allowed):
  """softmax(q k^T / sqrt(H)) v in float32, head n of group g reading kv head k."""
  q, key, value = (x.astype(jnp.float32) for x in (q, key, value))
  scores = jnp.einsum("bkgth,bksh->bkgts", q, key) / np.sqrt(q.shape[-1])
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bkgts,bksh->bkgth", jax.nn.softmax(scores, axis=-1), value)


def _inputs(dtype, b=2, k=2, g=3, t=5, s=7, h=8):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, k, g, t, h)).astype(dtype)
  key = jax.random.normal(keys[1], (b, k, s, h)).astype(dtype)
  value = jax.random.normal(keys[2], (b, k, s, h)).astype(dtype)
  # causal over the last t of s slots, row 1 with two padded slots in front
  causal = jnp.arange(s)[None, :] <= (s - t + jnp.arange(t))[:, None]  # [T, S]
  padded = jnp.arange(s) >= jnp.asarray([0, 2])[:, None]  # [B, S]
  allowed = causal[None] & padded[:, None, :]
  cotangent = jax.random.normal(keys[3], (b, k, g, t, h)).astype(dtype)
  return q, key, value, allowed, cotangent


@pytest.mark.parametrize("chunk", [128, 2, 3])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_values_and_gradients_equal_autodiff_of_the_formula(dtype, tol, chunk):
  """One chunk, chunks that divide T = 6 and chunks that do not."""
  q, key, value, allowed, cotangent = _inputs(dtype, t=6, s=8)
  out, vjp = jax.vjp(lambda *x: attention.attend(*x, allowed, chunk), q, key, value)
  ref_out, ref_vjp = jax.vjp(lambda *x: _reference(*x, allowed), q, key, value)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, rtol=tol, atol=tol)
  grads = jax.jit(vjp)(cotangent)
  ref_grads = ref_vjp(cotangent.astype(jnp.float32))
  for name, grad, ref in zip(("q", "key", "value"), grads, ref_grads):
    assert grad.dtype == dtype, name
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(grad, np.float32) / scale, ref / scale,
                               rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("chunk", [128, 2])
def test_masked_slots_get_no_gradient(chunk):
  q, key, value, allowed, cotangent = _inputs(jnp.float32)
  _, vjp = jax.vjp(lambda *x: attention.attend(*x, allowed, chunk), q, key, value)
  _, d_key, d_value = vjp(cotangent)
  # Row 1's first two slots are padding: no query reads them.
  assert not np.any(np.asarray(d_key[1, :, :2]))
  assert not np.any(np.asarray(d_value[1, :, :2]))
  assert np.all(np.any(np.asarray(d_key[0]) != 0, axis=-1))
