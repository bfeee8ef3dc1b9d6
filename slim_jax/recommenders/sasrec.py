"""SASRec (Kang and McAuley, ICDM 2018) with RecBole 1.2.1's semantics.

item embedding + learned position embedding -> LayerNorm -> dropout -> blocks of
[causal multi-head self-attention -> dense -> dropout -> residual -> LayerNorm,
 dense -> GELU -> dense -> dropout -> residual -> LayerNorm] (post-LN, as RecBole).
Attention masks padded keys and the future with an additive -10000 (RecBole's constant).

Positions count from the first real item, as in RecBole (which pads on the right): with
our left padding, position 0 is still the oldest item, so a left-padded sequence gives the
same output at its last position as RecBole's right-padded one (tested against a port of
RecBole's modules in tests/reference/).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from slim_jax.models.layers import Dropout, Linear
from slim_jax.recommenders.backbone import input_vectors, masked_item_table, padding_mask

_NORMAL = nn.initializers.normal(stddev=0.02)  # RecBole's initializer_range


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  num_items: int  # V; the table has V + 1 rows (0 = padding)
  max_len: int = 50
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 2
  inner_size: int | None = None  # feed-forward width; None = 4 * hidden_size (RecBole: 256)
  dropout: float = 0.5  # hidden and attention dropout (RecBole's two 0.5 defaults)
  layer_norm_eps: float = 1e-12

  @classmethod
  def tiny(cls, num_items: int = 30) -> "SASRecConfig":
    return cls(num_items=num_items, max_len=8, hidden_size=16, num_layers=2, num_heads=2,
               dropout=0.1)

  @property
  def ffn_size(self) -> int:
    return self.inner_size or 4 * self.hidden_size


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class SASRecBlock(nn.Module):
  config: SASRecConfig

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, deterministic: bool,
               last_only: bool = False) -> jnp.ndarray:
    # x [B, L, D], bias [B, 1, L, L] additive attention mask -> [B, T, D], T = L; with
    # last_only T = 1: only the last position's output (its query, residual and
    # feed-forward), the same numbers for the price of the keys and values
    cfg = self.config
    n = cfg.num_heads
    b, l, d = x.shape
    h = d // n

    def proj(name, inputs):
      y = Linear(d, ("embed", "heads"), use_bias=True, kernel_init=_NORMAL, name=name)(inputs)
      return y.reshape(b, inputs.shape[1], n, h)  # [B, T or L, N, H]

    k, v = proj("key", x), proj("value", x)  # [B, L, N, H]
    if last_only:
      x, bias = x[:, -1:], bias[:, :, -1:]  # [B, 1, D], [B, 1, 1, L]
    q = proj("query", x)  # [B, T, N, H]
    t = x.shape[1]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(jnp.float32(h)) + bias
    probs = jax.nn.softmax(scores, axis=-1)  # [B, N, T, S]
    probs = Dropout(cfg.dropout)(probs, deterministic=deterministic)
    context = jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, d)
    y = Linear(d, ("heads", "embed"), use_bias=True, kernel_init=_NORMAL, name="attn_out")(context)
    y = Dropout(cfg.dropout)(y, deterministic=deterministic)
    x = _layer_norm(cfg.layer_norm_eps, "attn_norm")(y + x)

    y = Linear(cfg.ffn_size, ("embed", "mlp"), use_bias=True, kernel_init=_NORMAL,
               name="ffn_in")(x)
    y = jax.nn.gelu(y, approximate=False)  # RecBole's erf GELU
    y = Linear(d, ("mlp", "embed"), use_bias=True, kernel_init=_NORMAL, name="ffn_out")(y)
    y = Dropout(cfg.dropout)(y, deterministic=deterministic)
    return _layer_norm(cfg.layer_norm_eps, "ffn_norm")(y + x)


class SASRec(nn.Module):
  config: SASRecConfig

  def setup(self):
    cfg = self.config
    if cfg.hidden_size % cfg.num_heads:
      raise ValueError(f"SASRec: hidden_size {cfg.hidden_size} is not divisible by "
                       f"num_heads {cfg.num_heads}; change --hidden_size or --num_heads")
    self.item_embedding = nn.Embed(
        cfg.num_items + 1, cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(_NORMAL, ("items", "embed")))
    self.position_embedding = nn.Embed(
        cfg.max_len, cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(_NORMAL, ("length", "embed")))
    self.input_norm = _layer_norm(cfg.layer_norm_eps, "input_norm")
    self.input_dropout = Dropout(cfg.dropout)
    self.blocks = [SASRecBlock(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]

  def item_embeddings(self) -> jnp.ndarray:
    return masked_item_table(self.item_embedding.embedding)  # [V+1, D]

  def encode(self, inputs: jnp.ndarray, deterministic: bool = True,
             last_only: bool = False, table: jnp.ndarray | None = None) -> jnp.ndarray:
    # inputs [B, L] -> [B, L, D]; last_only: [B, 1, D], the last position's output;
    # table [V+1, D]: the input item vectors (default: this backbone's item embeddings)
    if inputs.shape[1] > self.config.max_len:
      raise ValueError(f"SASRec: sequences of length {inputs.shape[1]} exceed max_len "
                       f"{self.config.max_len} (the position table's size)")
    mask = padding_mask(inputs)  # [B, L]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # [B, L], 0 = oldest item
    x = input_vectors(self.item_embeddings() if table is None else table, inputs)
    x = x + self.position_embedding(positions)
    x = self.input_dropout(self.input_norm(x), deterministic=deterministic)  # [B, L, D]
    l = inputs.shape[1]
    causal = jnp.tril(jnp.ones((l, l), bool))  # [T, S]
    allowed = causal[None, None] & mask[:, None, None, :]  # [B, 1, T, S]
    bias = jnp.where(allowed, 0.0, -10000.0).astype(x.dtype)
    for i, block in enumerate(self.blocks):
      x = block(x, bias, deterministic, last_only=last_only and i == len(self.blocks) - 1)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B, L or 1, D]

  def encode_last(self, inputs: jnp.ndarray, deterministic: bool = True,
                  table: jnp.ndarray | None = None) -> jnp.ndarray:
    # The last block computes the last position only: about 40% less work for scoring.
    return self.encode(inputs, deterministic, last_only=True, table=table)[:, 0]  # [B, D]
