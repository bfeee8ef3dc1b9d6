"""The registry of sequential-recommender backbones: name -> config and module, with
RecBole 1.2.1's default sizes where the experiment leaves one unset.

  registry.backbone_names()                         -> ('gru4rec', 'sasrec', 'srgnn')
  registry.make_recommender('sasrec', num_items=V)  -> backbone.Recommender for training
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn

from slim_jax.recommenders import backbone, gru4rec, sasrec, srgnn


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build one backbone from the experiment's size flags."""

  config_cls: Any
  module_cls: Any
  # Defaults from RecBole 1.2.1's yaml files where the experiment leaves a size unset.
  default_num_layers: int
  default_dropout: float


def _registry() -> dict[str, BackboneSpec]:
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


def make_recommender(name: str, **sizes) -> backbone.Recommender:
  """`make_recommender('sasrec', num_items=V, hidden_size=64)`: backbone wrapped for training."""
  return backbone.Recommender(backbone=make_backbone(name, make_config(name, **sizes)))
