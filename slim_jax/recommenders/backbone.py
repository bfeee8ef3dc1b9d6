"""The interface every sequential-recommender backbone offers, and the registry of backbones.

A backbone (GRU4Rec, SASRec, SR-GNN) exposes its two halves SEPARATELY so that a wrapper
can change either before scoring (the SLIM fusion, slim_jax/recommenders/slim.py, computes
`z_i = g_f([g_l(text_i); z_id_i])` and `s_u = g_f([g_l(text_u); s_seq_u])`):

  backbone.item_embeddings()                      -> z_id  [V+1, D]   (row 0, padding, is zero)
  backbone.encode(inputs, deterministic=...)      -> s_seq [B, L, D]  one vector per position:
                                                     position t represents the prefix ending at t
  backbone.encode_last(inputs, deterministic=...) -> s_seq [B, D]     the whole (left-padded) sequence

Inputs are left-padded item ids [B, L] (0 = padding, the last column is the newest item).
The score of item i for a sequence is the dot product <s_u, z_i> (`score_candidates`,
`score_all`).

`Recommender` is the module the training loop trains: it wraps one backbone and returns
both representations in one call; wrappers that fuse text implement the same call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import linen as nn


class Representations(NamedTuple):
  sequence: jnp.ndarray  # [B, L, D] (all_positions=True) or [B, D]
  items: jnp.ndarray  # [V+1, D]


class Recommender(nn.Module):
  """A backbone alone, scored by <s_u, z_id_i>. The parameters live under 'backbone'.

  `users` [B] is accepted (and ignored) so that every recommender, including the
  text-fused ones that look up a per-user rationale vector, has one call signature.
  """

  backbone: nn.Module

  def __call__(self, inputs: jnp.ndarray, users: jnp.ndarray | None = None, *,
               deterministic: bool = True, all_positions: bool = False) -> Representations:
    del users
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


def masked_item_table(embedding: jnp.ndarray) -> jnp.ndarray:
  """Zeroes row 0 (padding) of an item table [V+1, D], like torch's padding_idx=0."""
  keep = (jnp.arange(embedding.shape[0]) > 0)[:, None]
  return jnp.where(keep, embedding, 0.0)


# ---------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build one backbone from the experiment's size flags."""

  config_cls: Any
  module_cls: Any
  # Defaults from RecBole 1.2.1's yaml files where the experiment leaves a size unset.
  default_num_layers: int
  default_dropout: float


def _registry() -> dict[str, BackboneSpec]:
  # Imported here: the model files import helpers from this module.
  from slim_jax.recommenders import gru4rec, sasrec, srgnn
  return {
      "gru4rec": BackboneSpec(gru4rec.GRU4RecConfig, gru4rec.GRU4Rec, 1, 0.3),
      "sasrec": BackboneSpec(sasrec.SASRecConfig, sasrec.SASRec, 2, 0.5),
      "srgnn": BackboneSpec(srgnn.SRGNNConfig, srgnn.SRGNN, 1, 0.0),
  }


def backbone_names() -> tuple[str, ...]:
  return tuple(_registry())


def make_config(name: str, *, num_items: int, max_len: int = 50, hidden_size: int = 64,
                num_layers: int | None = None, num_heads: int | None = None,
                dropout: float | None = None):
  """The frozen config of backbone `name`; unset sizes take RecBole 1.2.1's defaults."""
  registry = _registry()
  if name not in registry:
    raise ValueError(f"unknown recommender backbone {name!r}; choose from {sorted(registry)}")
  spec = registry[name]
  kwargs = dict(num_items=num_items, max_len=max_len, hidden_size=hidden_size,
                num_layers=spec.default_num_layers if num_layers is None else num_layers,
                dropout=spec.default_dropout if dropout is None else dropout)
  if name == "sasrec":
    kwargs["num_heads"] = 2 if num_heads is None else num_heads
  return spec.config_cls(**kwargs)


def make_backbone(name: str, config) -> nn.Module:
  return _registry()[name].module_cls(config)


def make_recommender(name: str, **sizes) -> Recommender:
  """`make_recommender('sasrec', num_items=V, hidden_size=64)`: backbone wrapped for training."""
  return Recommender(backbone=make_backbone(name, make_config(name, **sizes)))
