"""Next-token cross-entropy over a large vocabulary without the [B, T, V] logits.

`chunked_nll` takes the decoder's final hidden states and the output projection, and
computes `-log softmax(h W)[target]` a chunk of tokens at a time inside a `lax.scan` whose
body is rematerialised: the forward pass keeps one [chunk, V] block of logits alive, the
backward pass recomputes each block from its hidden states. For SmolLM2 (V = 49,152) at
batch 4 x 512 the full float32 logits are 403 MB, written once and read by the softmax, the
gather and again in the backward pass; at chunks of 512 tokens a block is 101 MB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from slim_jax.models import layers

DEFAULT_CHUNK = 512  # tokens per block of logits


def chunked_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array,
                dtype, chunk: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
  """(sum of masked -log P(target), sum of the mask).

  hidden [B, T, D] (after the final norm); head [D, V] (the output kernel, or a tied
  embedding transposed); targets [B, T] int; mask [B, T] (0 where no loss); dtype: the
  products' operand dtype (layers.matmul's rule: 16-bit operands accumulate in float32).
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

  @jax.checkpoint
  def block_nll(h, t, m):  # h [C, D], t [C], m [C] -> []
    logits = layers.matmul(h, head, dtype, jnp.float32)  # [C, V]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return jnp.sum((logz - picked) * m)

  def body(total, xs):
    return total + block_nll(*xs), None

  xs = (flat_h.reshape(blocks, chunk, d), flat_t.reshape(blocks, chunk),
        flat_m.reshape(blocks, chunk))
  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total, jnp.sum(flat_m)
