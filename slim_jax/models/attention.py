"""Causal grouped-query attention over allowed key slots, with its backward pass written out.

`attend(q [B, K, G, T, H], key [B, K, S, H], value [B, K, S, H], allowed [B, T, S] bool,
chunk)` -> [B, K, G, T, H]: softmax(q k^T / sqrt(H)) v, the G query heads of each kv head and
the T positions forming one [G*T, H] matrix per (row, kv head). The queries are the last T of
the S slots and read no slot after their own (causal); `allowed` may mask more (padding).
It is slim_jax/models/llama.py's attention for full sequences without a cache (training and
scoring); the decode and prefix paths stay in llama._attend.

The queries go in chunks of `chunk` positions, each against the slots up to its last
position only, so most of the masked upper triangle is never computed (at T = 512 and
chunks of 128, 62% of the full score matrix). One custom VJP covers every chunk: the
backward pass joins the chunks' dQ along T and adds their dK, dV into the slots they read.
(Chunks as separate differentiated calls padded each chunk's dQ to the full length and
summed the pads, in one slow fused loop with RoPE's backward pass.)

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

import functools

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


def query_chunks(t: int, s: int, chunk: int):
  """(lo, hi, keys) per query chunk: queries [lo, hi) read the first `keys` slots."""
  return [(lo, min(lo + chunk, t), s - t + min(lo + chunk, t)) for lo in range(0, t, chunk)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q, key, value, allowed, chunk):
  return _attend_fwd(q, key, value, allowed, chunk)[0]


def _attend_fwd(q, key, value, allowed, chunk):
  outs, probs = [], []
  for lo, hi, keys in query_chunks(q.shape[3], key.shape[2], chunk):
    out, p = _forward(q[:, :, :, lo:hi], key[:, :, :keys], value[:, :, :keys],
                      allowed[:, lo:hi, :keys])
    outs.append(out)
    probs.append(p)
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out, (q, key, value, tuple(probs), out)


def _chunk_grads(q, key, value, probs, out, d_out):
  """(dQ in q's dtype, dK, dV in float32) of one query chunk; probs [B, K, G*T, S'] in the
  values' dtype, the other arguments sliced to the chunk's queries and keys."""
  b, k, g, t, h = q.shape
  q2, out2 = q.reshape(b, k, g * t, h), out.reshape(b, k, g * t, h)
  d_out2 = d_out.reshape(b, k, g * t, h)
  d_value = _dot(probs, d_out2.astype(probs.dtype), ((2,), (2,)))  # [B, K, S', H]
  d_probs = _dot(d_out2.astype(value.dtype), value, ((3,), (3,)))  # [B, K, G*T, S'] f32
  delta = jnp.sum(d_out2.astype(jnp.float32) * out2.astype(jnp.float32), axis=-1,
                  keepdims=True)  # [B, K, G*T, 1]
  d_scores = (probs.astype(jnp.float32) * (d_probs - delta) / np.sqrt(h)).astype(q.dtype)
  d_q = _dot(d_scores, key.astype(q.dtype), ((3,), (2,)), q.dtype)  # [B, K, G*T, H]
  d_key = _dot(d_scores, q2, ((2,), (2,)))  # [B, K, S', H]
  return d_q.reshape(q.shape), d_key, d_value


def _attend_bwd(chunk, residuals, d_out):
  q, key, value, probs, out = residuals
  d_q = []
  d_key = jnp.zeros(key.shape, jnp.float32)
  d_value = jnp.zeros(value.shape, jnp.float32)
  for (lo, hi, keys), p in zip(query_chunks(q.shape[3], key.shape[2], chunk), probs):
    dq, dk, dv = _chunk_grads(q[:, :, :, lo:hi], key[:, :, :keys], value[:, :, :keys], p,
                              out[:, :, :, lo:hi], d_out[:, :, :, lo:hi])
    d_q.append(dq)
    d_key = d_key.at[:, :, :keys].add(dk)
    d_value = d_value.at[:, :, :keys].add(dv)
  d_q = d_q[0] if len(d_q) == 1 else jnp.concatenate(d_q, axis=3)
  return d_q, d_key.astype(key.dtype), d_value.astype(value.dtype), None


attend.defvjp(_attend_fwd, _attend_bwd)
