"""Blocks shared by the LLaMA and BERT models.

`Linear` is the one dense layer of the project. Its kernel is stored [in, out] with logical
axis names, and it applies a LoRA adapter when the caller passes one in the `lora`
variable collection (`{'a': [in, r], 'b': [r, out]}` beside each adapted kernel):

  y = x @ W + scale * (dropout(x) @ a) @ b

so the frozen base kernel W is never merged or copied during training (slim_jax/models/lora.py
builds and trains that collection).

With a 16-bit compute dtype every product goes through `matmul`: 16-bit operands, float32
accumulation, in the forward pass and in both products of the backward pass. XLA:CPU runs
bf16 x bf16 -> f32 products on the bf16 matrix units of recent x86 CPUs (AMX, AVX512-BF16),
about 3x its float32 rate on the 2-core machine; a bf16 x bf16 -> bf16 product, the default
rule's backward included, falls back to a slower path than float32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

LORA_COLLECTION = "lora"


def matmul(x: jax.Array, w: jax.Array, dtype: Dtype, out_dtype: Dtype | None = None
           ) -> jax.Array:
  """x [..., I] @ w [I, F] -> [..., F] in `out_dtype` (default `dtype`), operands in `dtype`;
  16-bit dtypes accumulate in float32 (forward and backward)."""
  out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
  if jnp.dtype(dtype).itemsize >= 4:
    return jnp.einsum("...i,if->...f", x.astype(dtype), w.astype(dtype)).astype(out_dtype)
  return _mixed_matmul(x.astype(dtype), w.astype(dtype), out_dtype)


def _dot(spec, a, b, dtype):  # 16-bit operands, float32 accumulation
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_matmul(x, w, out_dtype):
  return _dot("...i,if->...f", x, w, out_dtype)


def _mixed_matmul_fwd(x, w, out_dtype):
  return _mixed_matmul(x, w, out_dtype), (x, w)


def _mixed_matmul_bwd(out_dtype, residuals, g):
  del out_dtype
  x, w = residuals  # x [..., I], w [I, F]; g [..., F]
  g = g.astype(x.dtype)
  return _dot("...f,if->...i", g, w, x.dtype), _dot("...i,...f->if", x, g, w.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float
                      ) -> tuple[jax.Array, float]:
  """(keep [shape] bool, the keep probability it was drawn with) for dropout at `rate`.

  Each element reads a b-bit field of a random uint32 word instead of a word of its own
  (jax.random.bernoulli): b is the fewest bits of 1, 2, 4, 8 and 16 that hold `rate`
  exactly (1 bit for 0.5), else 16 bits when they hold it to 0.1% (0.3 becomes 19661 /
  65536), else 32; so the random words, and the threefry work that makes them, shrink up
  to 32 times. On the 2-core CPU the bits took about a fifth of a SASRec train step
  (docs/results/grid_speed.md).
  """
  exact = [b for b in (1, 2, 4, 8, 16) if float(rate * 2 ** b).is_integer()]
  close = abs(round(rate * 2 ** 16) / 2 ** 16 - rate) <= 1e-3 * min(rate, 1.0 - rate)
  bits = exact[0] if exact else 16 if close else 32
  # field < threshold: dropped; at least one value dropped and one kept (rates within
  # 2**-32 of 0 or 1 round to the nearest such)
  threshold = min(max(round(rate * 2 ** bits), 1), 2 ** bits - 1)
  per_word = 32 // bits
  words = -(-shape[-1] // per_word)  # per row of the last axis
  raw = jax.random.bits(key, (*shape[:-1], words), jnp.uint32)  # [..., W]
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits  # [per_word]
  fields = (raw[..., None] >> shifts) & jnp.uint32(2 ** bits - 1)  # [..., W, per_word]
  fields = fields.reshape(*shape[:-1], words * per_word)[..., :shape[-1]]  # [shape]
  return fields >= jnp.uint32(threshold), 1.0 - threshold / 2 ** bits


class Dropout(nn.Module):
  """Inverted dropout (kept elements scaled by 1 / keep probability) with masks from
  `dropout_keep_mask`; the 'dropout' rng stream, like flax's nn.Dropout."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep, keep_prob = dropout_keep_mask(self.make_rng("dropout"), x.shape, self.rate)
    scaled = (x.astype(jnp.float32) / keep_prob).astype(x.dtype)  # 1 / keep_prob unrounded
    return jnp.where(keep, scaled, jnp.zeros((), x.dtype))


class Linear(nn.Module):
  """x [..., I] -> [..., F], kernel [I, F] named by `axes` (in, out)."""

  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=0.02)
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = matmul(x, kernel, self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable(LORA_COLLECTION, "a"):
      a = self.get_variable(LORA_COLLECTION, "a")  # [I, r]
      b = self.get_variable(LORA_COLLECTION, "b")  # [r, F]
      x_lora = Dropout(self.lora_dropout)(x, deterministic=deterministic)
      y = y + self.lora_scale * matmul(matmul(x_lora, a, self.dtype), b, self.dtype)
    return y
