"""The interface every sequential-recommender backbone offers (the registry of backbones is
slim_jax/recommenders/registry.py).

A backbone (GRU4Rec, SASRec, SR-GNN) exposes its two halves SEPARATELY so that a wrapper
can change either before scoring (the SLIM fusion, slim_jax/recommenders/slim.py, computes
`z_i = g_f([g_l(text_i); z_id_i])` and `s_u = g_f([g_l(text_u); s_seq_u])`):

  backbone.item_embeddings()                      -> z_id  [V+1, D]   (row 0, padding, is zero)
  backbone.encode(inputs, deterministic=...)      -> s_seq [B, L, D]  one vector per position:
                                                     position t represents the prefix ending at t
  backbone.encode_last(inputs, deterministic=...) -> s_seq [B, D]     the whole (left-padded) sequence

Both take `table=` [V+1, D], the vectors the items are read as (default: item_embeddings();
backbone+ and SLIM pass the fused table z_i, so the item text enters the encoder too).

Inputs are left-padded item ids [B, L] (0 = padding, the last column is the newest item).
The score of item i for a sequence is the dot product <s_u, z_i> (`score_candidates`,
`score_all`).

`Recommender` is the module the training loop trains: it wraps one backbone and returns
both representations in one call; wrappers that fuse text implement the same call.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from flax import linen as nn


class Representations(NamedTuple):
  sequence: jnp.ndarray  # [B, L, D] (all_positions=True) or [B, D]
  items: jnp.ndarray  # [V+1, D]


class Recommender(nn.Module):
  """A backbone alone, scored by <s_u, z_id_i>. The parameters live under 'backbone'.

  `users` [B] and `lengths` [B, L] are accepted (and ignored) so that every recommender,
  including the text-fused ones that look up a per-user rationale, has one call signature.
  """

  backbone: nn.Module

  def __call__(self, inputs: jnp.ndarray, users: jnp.ndarray | None = None,
               lengths: jnp.ndarray | None = None, *, deterministic: bool = True,
               all_positions: bool = False) -> Representations:
    del users, lengths
    if all_positions:
      sequence = self.backbone.encode(inputs, deterministic=deterministic)  # [B, L, D]
    else:
      sequence = self.backbone.encode_last(inputs, deterministic=deterministic)  # [B, D]
    return Representations(sequence=sequence, items=self.backbone.item_embeddings())


def score_candidates(sequence: jnp.ndarray, items: jnp.ndarray,
                     candidates: jnp.ndarray) -> jnp.ndarray:
  """sequence [B, D], items [V+1, D], candidates [B, C] -> scores [B, C]."""
  return jnp.einsum("bd,bcd->bc", sequence, jnp.take(items, candidates, axis=0))


def score_all(sequence: jnp.ndarray, items: jnp.ndarray) -> jnp.ndarray:
  """sequence [..., D], items [V+1, D] -> scores [..., V+1]."""
  return jnp.einsum("...d,vd->...v", sequence, items)


def padding_mask(inputs: jnp.ndarray) -> jnp.ndarray:
  """[B, L] item ids -> [B, L] bool, True at real items."""
  return inputs > 0


def input_vectors(table: jnp.ndarray, inputs: jnp.ndarray) -> jnp.ndarray:
  """table [V+1, D], inputs [B, L] -> [B, L, D]: the vectors a backbone reads its items as
  (its own item embeddings, or a fused table such as SLIM's z_i)."""
  return jnp.take(table, inputs, axis=0)


def masked_item_table(embedding: jnp.ndarray) -> jnp.ndarray:
  """Zeroes row 0 (padding) of an item table [V+1, D], like torch's padding_idx=0."""
  keep = (jnp.arange(embedding.shape[0]) > 0)[:, None]
  return jnp.where(keep, embedding, 0.0)
