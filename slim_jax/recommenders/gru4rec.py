"""GRU4Rec (Hidasi et al., ICLR 2016) as RecBole 1.2.1 builds it.

item embedding -> dropout -> stacked GRU (no biases, like RecBole's `nn.GRU(bias=False)`)
-> dense back to the embedding width. The GRU's output at position t is the representation
of the prefix ending at t; items are scored against the same embedding table.

Left padding is exact: a padded step leaves the hidden state unchanged, so the output at
the last position equals that of the unpadded sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from slim_jax.models.layers import Dropout, Linear
from slim_jax.recommenders.backbone import input_vectors, masked_item_table, padding_mask


@dataclasses.dataclass(frozen=True)
class GRU4RecConfig:
  num_items: int  # V; the table has V + 1 rows (0 = padding)
  max_len: int = 50
  hidden_size: int = 64  # embedding width D and GRU width
  num_layers: int = 1
  dropout: float = 0.3  # on the input embeddings (RecBole's dropout_prob)
  use_bias: bool = False  # RecBole's GRU has no biases

  @classmethod
  def tiny(cls, num_items: int = 30) -> "GRU4RecConfig":
    return cls(num_items=num_items, max_len=8, hidden_size=16, num_layers=2, dropout=0.1)


class GRULayer(nn.Module):
  """One GRU layer over time, torch.nn.GRU's equations and gate order (r, z, n).

  kernel_i [I, 3H] and kernel_h [H, 3H] are torch's weight_ih / weight_hh transposed.
  The input projection of all steps is one matmul; only the recurrent part is scanned.
  """

  features: int
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    # x [B, L, I], mask [B, L] -> [B, L, H]
    h_size = self.features
    init = nn.initializers.xavier_uniform()
    kernel_i = self.param("kernel_i", nn.with_logical_partitioning(init, ("embed", "mlp")),
                          (x.shape[-1], 3 * h_size))
    kernel_h = self.param("kernel_h", nn.with_logical_partitioning(init, (None, "mlp")),
                          (h_size, 3 * h_size))
    gi = jnp.einsum("bli,ig->blg", x, kernel_i)  # [B, L, 3H]
    if self.use_bias:
      zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",))
      gi = gi + self.param("bias_i", zeros, (3 * h_size,))
      bias_h = self.param("bias_h", zeros, (3 * h_size,))
    else:
      bias_h = jnp.zeros((3 * h_size,), x.dtype)

    def step(h, inputs):
      gi_t, m_t = inputs  # [B, 3H], [B]
      gh = h @ kernel_h + bias_h  # [B, 3H]
      i_r, i_z, i_n = jnp.split(gi_t, 3, axis=-1)
      h_r, h_z, h_n = jnp.split(gh, 3, axis=-1)
      r = jax.nn.sigmoid(i_r + h_r)
      z = jax.nn.sigmoid(i_z + h_z)
      n = jnp.tanh(i_n + r * h_n)
      h_new = (1.0 - z) * n + z * h
      h = jnp.where(m_t[:, None], h_new, h)
      return h, h

    h0 = jnp.zeros((x.shape[0], h_size), x.dtype)
    _, hs = jax.lax.scan(step, h0, (jnp.swapaxes(gi, 0, 1), jnp.swapaxes(mask, 0, 1)))
    return jnp.swapaxes(hs, 0, 1)  # [B, L, H]


class GRU4Rec(nn.Module):
  config: GRU4RecConfig

  def setup(self):
    cfg = self.config
    self.item_embedding = nn.Embed(
        cfg.num_items + 1, cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(nn.initializers.xavier_normal(),
                                                    ("items", "embed")))
    self.gru = [GRULayer(cfg.hidden_size, cfg.use_bias, name=f"gru_{i}")
                for i in range(cfg.num_layers)]
    self.dense = Linear(cfg.hidden_size, ("mlp", "embed"), use_bias=True,
                        kernel_init=nn.initializers.xavier_uniform())
    self.emb_dropout = Dropout(cfg.dropout)

  def item_embeddings(self) -> jnp.ndarray:
    return masked_item_table(self.item_embedding.embedding)  # [V+1, D]

  def _hidden_states(self, inputs: jnp.ndarray, deterministic: bool,
                     table: jnp.ndarray | None) -> jnp.ndarray:
    mask = padding_mask(inputs)  # [B, L]
    x = input_vectors(self.item_embeddings() if table is None else table, inputs)  # [B, L, D]
    x = self.emb_dropout(x, deterministic=deterministic)
    for layer in self.gru:
      x = layer(x, mask)  # [B, L, H]
    return nn.with_logical_constraint(x, ("batch", "length", "mlp"))

  def encode(self, inputs: jnp.ndarray, deterministic: bool = True,
             table: jnp.ndarray | None = None) -> jnp.ndarray:
    return self.dense(self._hidden_states(inputs, deterministic, table))  # [B, L, D]

  def encode_last(self, inputs: jnp.ndarray, deterministic: bool = True,
                  table: jnp.ndarray | None = None) -> jnp.ndarray:
    return self.dense(self._hidden_states(inputs, deterministic, table)[:, -1])  # [B, D]
