"""Blocks shared by the LLaMA and BERT models.

`Linear` is the one dense layer of the project. Its kernel is stored [in, out] with logical
axis names, and it applies a LoRA adapter when the caller passes one in the `lora`
variable collection (`{'a': [in, r], 'b': [r, out]}` beside each adapted kernel):

  y = x @ W + scale * (dropout(x) @ a) @ b

so the frozen base kernel W is never merged or copied during training (slim_jax/models/lora.py
builds and trains that collection).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

LORA_COLLECTION = "lora"


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
    y = jnp.einsum("...i,if->...f", x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable(LORA_COLLECTION, "a"):
      a = self.get_variable(LORA_COLLECTION, "a").astype(self.dtype)  # [I, r]
      b = self.get_variable(LORA_COLLECTION, "b").astype(self.dtype)  # [r, F]
      x_lora = nn.Dropout(self.lora_dropout)(x, deterministic=deterministic)
      y = y + self.lora_scale * jnp.einsum(
          "...r,rf->...f", jnp.einsum("...i,ir->...r", x_lora, a), b)
    return y
