"""Grouped-query attention over allowed key slots, with its backward pass written out.

`attend(q [B, K, G, T, H], key [B, K, S, H], value [B, K, S, H], allowed [B, T, S] bool)`
-> [B, K, G, T, H]: softmax(q k^T / sqrt(H)) v, the G query heads of each kv head and the
T positions forming one [G*T, H] matrix per (row, kv head). It is slim_jax/models/llama.py's
attention for full sequences without a cache (training and scoring); the decode and prefix
paths stay in llama._attend.

The forward pass is llama._attend's: products with 16-bit operands accumulate in float32,
the softmax runs in float32, and the probabilities enter the product with the values in the
values' dtype. Autodiff of those ops spends most of the attention's time in element-wise
passes over the [B, K, G, T, S] scores (the mask's and the scaling's transposes, the
softmax's backward, dtype converts). The custom VJP keeps the probabilities as they entered
the values' product and uses the identity sum_s dP_s P_s = dO . O, a sum over H instead of
S (FlashAttention's `delta`):

  dV = P^T dO          dP = dO V^T          dS = P * (dP - rowsum(dO * O)) / sqrt(H)
  dQ = dS K            dK = dS^T Q

Masked slots have P = 0, so dS is 0 there without a mask in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_BATCH_BK = ((0, 1), (0, 1))  # dot_general batch dims: (row, kv head)


def _dot(a, b, contract, out_dtype=jnp.float32):
  """A product batched over (B, K) with float32 accumulation, in `out_dtype`."""
  return jax.lax.dot_general(a, b, (contract, _BATCH_BK),
                             preferred_element_type=jnp.float32).astype(out_dtype)


def _forward(q, key, value, allowed):
  b, k, g, t, h = q.shape
  q2 = q.reshape(b, k, g * t, h)
  scores = _dot(q2, key, ((3,), (3,))).reshape(b, k, g, t, -1) / np.sqrt(h)  # [B,K,G,T,S]
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype).reshape(b, k, g * t, -1)
  out = _dot(probs, value, ((3,), (2,)), q.dtype)  # [B, K, G*T, H]
  return out.reshape(b, k, g, t, h), probs


@jax.custom_vjp
def attend(q, key, value, allowed):
  return _forward(q, key, value, allowed)[0]


def _attend_fwd(q, key, value, allowed):
  out, probs = _forward(q, key, value, allowed)
  return out, (q, key, value, probs, out)


def _attend_bwd(residuals, d_out):
  q, key, value, probs, out = residuals  # probs [B, K, G*T, S] in the values' dtype
  b, k, g, t, h = q.shape
  q2, out2 = q.reshape(b, k, g * t, h), out.reshape(b, k, g * t, h)
  d_out2 = d_out.reshape(b, k, g * t, h)
  d_value = _dot(probs, d_out2.astype(probs.dtype), ((2,), (2,)), value.dtype)  # [B,K,S,H]
  d_probs = _dot(d_out2.astype(value.dtype), value, ((3,), (3,)))  # [B, K, G*T, S] f32
  delta = jnp.sum(d_out2.astype(jnp.float32) * out2.astype(jnp.float32), axis=-1,
                  keepdims=True)  # [B, K, G*T, 1]
  d_scores = (probs.astype(jnp.float32) * (d_probs - delta) / np.sqrt(h)).astype(q.dtype)
  d_q = _dot(d_scores, key.astype(q.dtype), ((3,), (2,)), q.dtype)  # [B, K, G*T, H]
  d_key = _dot(d_scores, q2, ((2,), (2,)), key.dtype)  # [B, K, S, H]
  return d_q.reshape(q.shape), d_key, d_value, None


attend.defvjp(_attend_fwd, _attend_bwd)
