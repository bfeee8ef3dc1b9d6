"""SLIM's rationale-enhanced recommenders (DESIGN.md step 4) and their baselines.

Every model here has the `Recommender` call of slim_jax/recommenders/backbone.py
(`model.apply({'params': p}, inputs [B, L], users [B], deterministic=, all_positions=)`
-> Representations(sequence, items)), so slim_jax/train/loop.py trains and evaluates them
unchanged. Text vectors (slim_jax/encode.py's items.npy [V+1, Dt] and <source>.npy [U, Dt])
are frozen inputs: they are constants of the module, never parameters.

- `SlimIDBased` (SLIM on a backbone):
    z_i = g_f([g_l(z_text_i); z_id_i]),  s_u = g_f([g_l(s_text_u); s_seq_u]),  score <s_u, z_i>
  where z_id / s_seq are the backbone's item table and sequence vectors and g_l, g_f are
  linear layers shared by the item and user side (both text vectors live in one encoder
  space). With `user_text=None` it is the backbone+ baseline: no rationale; the user's text
  vector is then the running mean of the history's item text vectors (so the item text
  concatenated to the ID embedding is the only text the model sees).
- `SlimIDAgnostic` (no ID embeddings): z_i = g_t(g_p(z_text_i)) and
  s_u = g_t([g_p(s_text_u); g_p(z_text_x1); ...; g_p(z_text_xt)])[t], where g_p is a linear
  projection and g_t transformer blocks (SASRec's block, shared by both sides; an item is a
  one-token sequence). Causal attention over the history with the rationale token visible
  from every position. Items are represented from their text alone, so the model scores
  items that never occurred in training.

Variants (`VARIANTS`, built by `make_model`): 'backbone', 'backbone+', 'slim-' (teacher
rationales), 'slim' (student rationales), 'agnostic' (student rationales, ID-agnostic) and
'agnostic-step1/2/3' (ID-agnostic on one step's vectors of the student rationale).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from slim_jax.models.layers import Linear
from slim_jax.recommenders import backbone as backbone_lib
from slim_jax.recommenders import registry
from slim_jax.recommenders.backbone import Representations, masked_item_table, padding_mask
from slim_jax.recommenders.sasrec import SASRecBlock, SASRecConfig

_NORMAL = nn.initializers.normal(stddev=0.02)


class Frozen:
  """A numpy array carried by a module as a constant (hashed by identity, never a param)."""

  def __init__(self, array: np.ndarray):
    self.array = np.asarray(array, np.float32)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.array.shape

  def __hash__(self) -> int:
    return id(self)

  def __eq__(self, other) -> bool:
    return self is other

  def __repr__(self) -> str:
    return f"Frozen(shape={self.array.shape})"


def _user_vectors(table: Frozen, users: jnp.ndarray | None, batch: int) -> jnp.ndarray:
  if users is None:
    raise ValueError("this model reads a rationale vector per user: pass `users` [B]")
  return jnp.take(jnp.asarray(table.array), users, axis=0)  # [B, Dt]


def _history_mean(item_text: jnp.ndarray, inputs: jnp.ndarray) -> jnp.ndarray:
  """[B, L] ids -> [B, L, Dt]: the mean text vector of the real items up to each position."""
  vectors = jnp.take(item_text, inputs, axis=0)  # [B, L, Dt]; row 0 is zeros
  count = jnp.cumsum(padding_mask(inputs), axis=1)[..., None]  # [B, L, 1]
  return jnp.cumsum(vectors, axis=1) / jnp.maximum(count, 1).astype(vectors.dtype)


class SlimIDBased(nn.Module):
  """SLIM on an ID backbone (or backbone+ when `user_text` is None)."""

  backbone: nn.Module
  item_text: Frozen  # [V+1, Dt], row 0 zeros
  user_text: Frozen | None = None  # [U, Dt] rationale vectors; None = backbone+

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, users: jnp.ndarray | None = None, *,
               deterministic: bool = True, all_positions: bool = False) -> Representations:
    z_id = self.backbone.item_embeddings()  # [V+1, D]
    d = z_id.shape[-1]
    g_l = Linear(d, ("mlp", "embed"), use_bias=True, kernel_init=_NORMAL, name="g_l")
    g_f = Linear(d, ("mlp", "embed"), use_bias=True, kernel_init=_NORMAL, name="g_f")
    item_text = jnp.asarray(self.item_text.array)  # [V+1, Dt]
    items = masked_item_table(g_f(jnp.concatenate([g_l(item_text), z_id], -1)))  # [V+1, D]

    if all_positions:
      seq = self.backbone.encode(inputs, deterministic=deterministic)  # [B, L, D]
    else:
      seq = self.backbone.encode_last(inputs, deterministic=deterministic)  # [B, D]
    if self.user_text is None:
      text = _history_mean(item_text, inputs)  # [B, L, Dt]
      text = text if all_positions else text[:, -1]
    else:
      text = _user_vectors(self.user_text, users, inputs.shape[0])  # [B, Dt]
      if all_positions:
        text = jnp.broadcast_to(text[:, None], seq.shape[:2] + text.shape[-1:])
    sequence = g_f(jnp.concatenate([g_l(text), seq], -1))
    return Representations(sequence=sequence, items=items)


@dataclasses.dataclass(frozen=True)
class IDAgnosticConfig:
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 2
  dropout: float = 0.2
  max_len: int = 50

  def block_config(self) -> SASRecConfig:
    return SASRecConfig(num_items=0, max_len=self.max_len + 1, hidden_size=self.hidden_size,
                        num_layers=self.num_layers, num_heads=self.num_heads,
                        dropout=self.dropout)


class SlimIDAgnostic(nn.Module):
  """ID-agnostic SLIM: every representation comes from text vectors."""

  config: IDAgnosticConfig
  item_text: Frozen  # [V+1, Dt]
  user_text: Frozen  # [U, Dt]

  def setup(self):
    cfg = self.config
    if cfg.hidden_size % cfg.num_heads:
      raise ValueError(f"ID-agnostic SLIM: hidden_size {cfg.hidden_size} is not divisible by "
                       f"num_heads {cfg.num_heads}")
    self.g_p = Linear(cfg.hidden_size, ("mlp", "embed"), use_bias=True, kernel_init=_NORMAL,
                      name="g_p")
    self.kind = nn.Embed(2, cfg.hidden_size, name="kind",  # 0 rationale token, 1 item token
                         embedding_init=nn.with_logical_partitioning(_NORMAL, (None, "embed")))
    self.position = nn.Embed(cfg.max_len + 1, cfg.hidden_size, name="position",
                             embedding_init=nn.with_logical_partitioning(
                                 _NORMAL, ("length", "embed")))
    self.norm = nn.LayerNorm(epsilon=1e-12, name="input_norm")
    self.drop = nn.Dropout(cfg.dropout)
    self.blocks = [SASRecBlock(cfg.block_config(), name=f"g_t_{i}")
                   for i in range(cfg.num_layers)]

  def _run(self, x: jnp.ndarray, bias: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    x = self.drop(self.norm(x), deterministic=deterministic)
    for block in self.blocks:
      x = block(x, bias, deterministic)
    return x

  def item_table(self, deterministic: bool = True) -> jnp.ndarray:
    """[V+1, D] item vectors from text only (any row, seen in training or not)."""
    text = jnp.asarray(self.item_text.array)  # [V+1, Dt]
    x = (self.g_p(text) + self.kind(jnp.ones((), jnp.int32)))[:, None]  # [V+1, 1, D]
    bias = jnp.zeros((1, 1, 1, 1), x.dtype)
    return masked_item_table(self._run(x, bias, deterministic)[:, 0])

  def __call__(self, inputs: jnp.ndarray, users: jnp.ndarray | None = None, *,
               deterministic: bool = True, all_positions: bool = False) -> Representations:
    b, l = inputs.shape
    if l > self.config.max_len:
      raise ValueError(f"ID-agnostic SLIM: sequences of length {l} exceed max_len "
                       f"{self.config.max_len}")
    item_text = jnp.asarray(self.item_text.array)
    rationale = self.g_p(_user_vectors(self.user_text, users, b)) + self.kind(
        jnp.zeros((), jnp.int32))  # [B, D]
    history = self.g_p(jnp.take(item_text, inputs, axis=0)) + self.kind(
        jnp.ones((), jnp.int32))  # [B, L, D]
    mask = padding_mask(inputs)  # [B, L]
    positions = jnp.cumsum(mask, axis=1) * mask  # [B, L]: 1 = oldest item, 0 = padding
    history = history + self.position(positions)
    rationale = rationale + self.position(jnp.zeros((b,), jnp.int32))
    x = jnp.concatenate([rationale[:, None], history], axis=1)  # [B, L+1, D]
    keys = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)  # [B, L+1]
    causal = jnp.tril(jnp.ones((l + 1, l + 1), bool))
    bias = jnp.where(causal[None, None] & keys[:, None, None, :], 0.0, -10000.0)
    out = self._run(x, bias.astype(x.dtype), deterministic)[:, 1:]  # [B, L, D]
    sequence = out if all_positions else out[:, -1]
    return Representations(sequence=sequence, items=self.item_table(deterministic))


# ----------------------------------------------------------------------------- variants

# variant -> (family, rationale source or None). Sources name slim_jax/encode.py outputs.
VARIANTS = {
    "backbone": ("id", None),
    "backbone+": ("id+", None),
    "slim-": ("id+", "teacher"),
    "slim": ("id+", "student"),
    "agnostic": ("agnostic", "student"),
    "agnostic-step1": ("agnostic", "student_step1"),
    "agnostic-step2": ("agnostic", "student_step2"),
    "agnostic-step3": ("agnostic", "student_step3"),
}


def variant_source(variant: str) -> str | None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown SLIM variant {variant!r}; choose from {sorted(VARIANTS)}")
  return VARIANTS[variant][1]


def is_id_agnostic(variant: str) -> bool:
  return variant in VARIANTS and VARIANTS[variant][0] == "agnostic"


def make_model(variant: str, backbone_name: str, *, num_items: int,
               item_text: np.ndarray | None = None, user_text: np.ndarray | None = None,
               max_len: int = 50, hidden_size: int = 64, num_layers: int | None = None,
               num_heads: int | None = None, dropout: float | None = None) -> nn.Module:
  """The module of `variant` ('backbone', 'slim', 'agnostic-step2', ...).

  ID-agnostic variants ignore `backbone_name`. item_text [V+1, Dt]; user_text [U, Dt] (the
  variant's rationale source) where the variant reads one.
  """
  family, source = VARIANTS.get(variant, (None, None))
  if family is None:
    raise ValueError(f"unknown SLIM variant {variant!r}; choose from {sorted(VARIANTS)}")
  if family != "id" and item_text is None:
    raise ValueError(f"variant {variant!r} needs the item text vectors (embeddings/items.npy)")
  if source is not None and user_text is None:
    raise ValueError(f"variant {variant!r} needs the rationale vectors embeddings/{source}.npy")
  if item_text is not None and item_text.shape[0] != num_items + 1:
    raise ValueError(f"item text vectors have {item_text.shape[0]} rows, expected "
                     f"num_items + 1 = {num_items + 1}; re-run the encode stage")
  if family == "agnostic":
    cfg = IDAgnosticConfig(hidden_size=hidden_size, max_len=max_len,
                           num_layers=2 if num_layers is None else num_layers,
                           num_heads=2 if num_heads is None else num_heads,
                           dropout=0.2 if dropout is None else dropout)
    return SlimIDAgnostic(cfg, Frozen(item_text), Frozen(user_text))
  net = registry.make_backbone(backbone_name, registry.make_config(
      backbone_name, num_items=num_items, max_len=max_len, hidden_size=hidden_size,
      num_layers=num_layers, num_heads=num_heads, dropout=dropout))
  if family == "id":
    return backbone_lib.Recommender(backbone=net)
  return SlimIDBased(net, Frozen(item_text), None if source is None else Frozen(user_text))
