"""Next-token cross-entropy over a large vocabulary without the [B, T, V] logits.

`chunked_nll` takes the decoder's final hidden states and the output projection, and
computes `-log softmax(h W)[target]` a chunk of tokens at a time inside a `lax.scan` whose
body is rematerialised: the forward pass keeps one [chunk, V] block of logits alive, the
backward pass recomputes each block from its hidden states. For SmolLM2 (V = 49,152) at
batch 4 x 512 the full float32 logits are 403 MB, written once and read by the softmax, the
gather and again in the backward pass; at chunks of 512 tokens a block is 101 MB.

With `frozen_head=True` (LoRA training: the head is a frozen base weight) the scan computes
each block's gradient with respect to its hidden states in the forward pass, from the
block's logits while they exist: d nll / d h = (softmax - onehot(target)) * mask, times the
head transposed. The backward pass then only scales those [N, D] gradients, instead of
recomputing every block's logits (a third of the loss's products) and its softmax. The
head's own gradient is then taken as zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from slim_jax.models import layers

DEFAULT_CHUNK = 512  # tokens per block of logits


def chunked_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array,
                dtype, chunk: int = DEFAULT_CHUNK, frozen_head: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """(sum of masked -log P(target), sum of the mask).

  hidden [B, T, D] (after the final norm); head [D, V] (the output kernel, or a tied
  embedding transposed); targets [B, T] int; mask [B, T] (0 where no loss); dtype: the
  products' operand dtype (layers.matmul's rule: 16-bit operands accumulate in float32).
  frozen_head: the head is not trained; its gradient is zero and hidden's is computed in
  the forward pass (see the module doc).
  """
  d = hidden.shape[-1]
  flat_h = hidden.reshape(-1, d)  # [N, D]
  flat_t = targets.reshape(-1).astype(jnp.int32)  # [N]
  flat_m = mask.reshape(-1).astype(jnp.float32)  # [N]
  n = flat_h.shape[0]
  chunk = min(chunk, n)
  blocks = -(-n // chunk)
  pad = blocks * chunk - n
  if pad:  # padded tokens carry mask 0
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
    flat_t = jnp.pad(flat_t, (0, pad))
    flat_m = jnp.pad(flat_m, (0, pad))
  xs = (flat_h.reshape(blocks, chunk, d), flat_t.reshape(blocks, chunk),
        flat_m.reshape(blocks, chunk))
  if frozen_head:
    total = _nll_frozen_head(xs[0], head, xs[1], xs[2], jnp.dtype(dtype))
    return total, jnp.sum(flat_m)

  @jax.checkpoint
  def block_nll(h, t, m):  # h [C, D], t [C], m [C] -> []
    logits = layers.matmul(h, head, dtype, jnp.float32)  # [C, V]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return jnp.sum((logz - picked) * m)

  def body(total, xs):
    return total + block_nll(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total, jnp.sum(flat_m)


def _blocks_nll_and_grad(h, head, t, m, dtype):
  """h [blocks, C, D], t and m [blocks, C] -> (sum of masked nll, d sum / d h [blocks, C, D]
  float32), one block of logits at a time."""

  def body(total, xs):
    h, t, m = xs  # [C, D], [C], [C]
    logits = layers.matmul(h, head, dtype, jnp.float32)  # [C, V]
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [C, 1]
    e = jnp.exp(logits - top)
    z = jnp.sum(e, axis=-1, keepdims=True)  # [C, 1]
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]  # [C]
    nll = jnp.log(z[:, 0]) + top[:, 0] - picked
    # softmax * m, minus m at each target: a scatter of C values, not a [C, V] comparison.
    d_logits = (e * (m / z[:, 0])[:, None]).at[jnp.arange(t.shape[0]), t].add(-m)  # [C, V]
    if jnp.dtype(dtype).itemsize >= 4:
      d_h = jnp.einsum("cv,dv->cd", d_logits, head.astype(jnp.float32))
    else:
      d_h = jnp.einsum("cv,dv->cd", d_logits.astype(dtype), head.astype(dtype),
                       preferred_element_type=jnp.float32)
    return total + jnp.sum(nll * m), d_h

  return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, m))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_frozen_head(h, head, t, m, dtype):
  return _blocks_nll_and_grad(h, head, t, m, dtype)[0]


def _nll_frozen_head_fwd(h, head, t, m, dtype):
  total, d_h = _blocks_nll_and_grad(h, head, t, m, dtype)
  return total, (d_h, h)  # h: its dtype for the cotangent (alive anyway)


def _nll_frozen_head_bwd(dtype, residuals, g):
  del dtype
  d_h, h = residuals
  return (g * d_h).astype(h.dtype), None, None, None


_nll_frozen_head.defvjp(_nll_frozen_head_fwd, _nll_frozen_head_bwd)
