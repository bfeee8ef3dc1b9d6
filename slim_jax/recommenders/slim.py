"""SLIM's rationale-enhanced recommenders (DESIGN.md step 4) and their baselines.

Every model here has the `Recommender` call of slim_jax/recommenders/backbone.py
(`model.apply({'params': p}, inputs [B, L], users [B], lengths [B, L], deterministic=,
all_positions=)` -> Representations(sequence, items)), so slim_jax/train/loop.py trains and
evaluates them unchanged. Text vectors (slim_jax/encode.py's items.npy [V+1, Dt] and the
rationale vectors) are frozen inputs: constants of the module, never parameters.

Rationales are causal (docs/causal_rationales.md, rationale_table.py): a position reads the
latest rationale written from items its history already holds, else a learned null vector;
`lengths` [B, L] says how many of the user's items each position's history holds.

- `SlimIDBased` (on a backbone):
    z_i = g_f([g_l(z_text_i); z_id_i])       the fused item table, read by the backbone as
                                             its input embeddings AND scored at the output
    s_u = g_f([g_l(r_u,t); s_seq_u,t])       SLIM: the backbone's sequence vector at t fused
                                             with the rationale position t may read
  g_l, g_f are linear layers shared by the item and user side (both texts live in one
  encoder space). With `rationales=None` it is backbone+ (the item feature extension: the
  fused table, no user text), so SLIM minus backbone+ measures the rationale alone.
- `SlimIDAgnostic` (no ID embeddings): z_i = g_t(g_p(z_text_i)) and s_u,t the output at t of
  g_t over [null; g_p(r_1..r_K); g_p(z_text_x1..x_t)], where g_p is a linear projection and
  g_t transformer blocks (SASRec's block, shared by both sides; an item is a one-token
  sequence). The history item texts are inputs too; rationale token k is hidden from the
  positions before its cutoff, the null token is visible from every position. With
  `rationales=None` (agnostic-history) it reads the history texts alone.

Variants (`VARIANTS`, built by `make_model`): 'backbone', 'backbone+', 'slim-' (teacher
rationales), 'slim' (student), 'slim-shuffled' (student rationales shuffled between users,
a control), 'agnostic' (student, ID-agnostic), 'agnostic-history' (ID-agnostic without a
rationale, a control) and 'agnostic-step1/2/3' (one step's text of the student rationale).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from slim_jax.models.layers import Dropout, Linear
from slim_jax.recommenders import backbone as backbone_lib
from slim_jax.recommenders import rationale_table
from slim_jax.recommenders import registry
from slim_jax.recommenders.backbone import Representations, masked_item_table, padding_mask
from slim_jax.recommenders.rationale_table import ModuleConstant, RationaleTable
from slim_jax.recommenders.sasrec import SASRecBlock, SASRecConfig

_NORMAL = nn.initializers.normal(stddev=0.02)
# g_l and g_f keep the scale of their inputs (variance 1/fan_in). With normal(0.02) both the
# user and the item vectors went through g_f at 1/20 of their scale, and on the default
# preset's 120 users a third of the seeds of every rationale row stopped on the popularity
# plateau at epoch 1-2 (SLIM on GRU4Rec, seed 1: test NDCG@10 0.131; with this init 0.364,
# beside backbone+ 0.359).
_FUSION_INIT = nn.initializers.lecun_normal()


class Frozen(ModuleConstant):
  """A numpy array carried by a module as a constant (hashed by identity, never a param)."""

  def __init__(self, array: np.ndarray):
    self.array = np.asarray(array, np.float32)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.array.shape

  def __repr__(self) -> str:
    return f"Frozen(shape={self.array.shape})"


def _null_vector(module: nn.Module, size: int) -> jnp.ndarray:
  """The learned vector read where no rationale is visible (or the user has none)."""
  return module.param("null_rationale", nn.with_logical_partitioning(_NORMAL, (None,)), (size,))


class SlimIDBased(nn.Module):
  """SLIM on an ID backbone (backbone+ when `rationales` is None)."""

  backbone: nn.Module
  item_text: Frozen  # [V+1, Dt], row 0 zeros
  rationales: RationaleTable | None = None  # None = backbone+

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, users: jnp.ndarray | None = None,
               lengths: jnp.ndarray | None = None, *, deterministic: bool = True,
               all_positions: bool = False) -> Representations:
    z_id = self.backbone.item_embeddings()  # [V+1, D]
    d = z_id.shape[-1]
    g_l = Linear(d, ("mlp", "embed"), use_bias=True, kernel_init=_FUSION_INIT, name="g_l")
    g_f = Linear(d, ("mlp", "embed"), use_bias=True, kernel_init=_FUSION_INIT, name="g_f")
    item_text = jnp.asarray(self.item_text.array)  # [V+1, Dt]
    items = masked_item_table(g_f(jnp.concatenate([g_l(item_text), z_id], -1)))  # [V+1, D]
    encode = self.backbone.encode if all_positions else self.backbone.encode_last
    seq = encode(inputs, deterministic=deterministic, table=items)  # [B, L, D] or [B, D]
    if self.rationales is None:
      return Representations(sequence=seq, items=items)
    lengths = rationale_table.prefix_lengths(inputs, lengths)  # [B, L]
    null = _null_vector(self, item_text.shape[-1])  # [Dt]
    # g_l projects each user's K rationale vectors, not the [B, L, Dt] vectors read.
    if all_positions:
      text = rationale_table.read(self.rationales, users, lengths, null, g_l)  # [B, L, D]
    else:
      text = rationale_table.read(self.rationales, users, lengths[:, -1:], null, g_l)[:, 0]
    sequence = g_f(jnp.concatenate([text, seq], -1))
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
  rationales: RationaleTable | None = None  # None = agnostic-history (no rationale)

  def setup(self):
    cfg = self.config
    if cfg.hidden_size % cfg.num_heads:
      raise ValueError(f"ID-agnostic SLIM: hidden_size {cfg.hidden_size} is not divisible by "
                       f"num_heads {cfg.num_heads}")
    self.g_p = Linear(cfg.hidden_size, ("mlp", "embed"), use_bias=True, kernel_init=_NORMAL,
                      name="g_p")
    self.kind = nn.Embed(3, cfg.hidden_size, name="kind",  # 0 rationale, 1 item, 2 null token
                         embedding_init=nn.with_logical_partitioning(_NORMAL, (None, "embed")))
    self.position = nn.Embed(cfg.max_len + 1, cfg.hidden_size, name="position",
                             embedding_init=nn.with_logical_partitioning(
                                 _NORMAL, ("length", "embed")))
    self.norm = nn.LayerNorm(epsilon=1e-12, name="input_norm")
    self.drop = Dropout(cfg.dropout)
    self.blocks = [SASRecBlock(cfg.block_config(), name=f"g_t_{i}")
                   for i in range(cfg.num_layers)]

  def _run(self, x: jnp.ndarray, bias: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    x = self.drop(self.norm(x), deterministic=deterministic)
    for block in self.blocks:
      x = block(x, bias, deterministic)
    return x

  def _kind(self, k: int) -> jnp.ndarray:
    return self.kind(jnp.full((), k, jnp.int32))  # [D]

  def item_table(self, projected: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """[V+1, D] item vectors from text only (any row, seen in training or not), from
    `projected` [V+1, D], g_p of every item's text vector."""
    x = (projected + self._kind(1))[:, None]  # [V+1, 1, D]
    bias = jnp.zeros((1, 1, 1, 1), x.dtype)
    return masked_item_table(self._run(x, bias, deterministic)[:, 0])

  def __call__(self, inputs: jnp.ndarray, users: jnp.ndarray | None = None,
               lengths: jnp.ndarray | None = None, *, deterministic: bool = True,
               all_positions: bool = False) -> Representations:
    b, l = inputs.shape
    if l > self.config.max_len:
      raise ValueError(f"ID-agnostic SLIM: sequences of length {l} exceed max_len "
                       f"{self.config.max_len}")
    mask = padding_mask(inputs)  # [B, L]
    positions = jnp.cumsum(mask, axis=1) * mask  # [B, L]: 1 = oldest item, 0 = padding
    # g_p is linear, so it projects the table once and the history reads rows of it: the
    # same vectors as projecting each gathered text, without the [B, L, Dt] gather and
    # its [B*L, Dt] x [Dt, D] products (Dt = 384 for MiniLM) in every step.
    projected = self.g_p(jnp.asarray(self.item_text.array))  # [V+1, D]
    history = (jnp.take(projected, inputs, axis=0) + self._kind(1)
               + self.position(positions))  # [B, L, D]
    front = [jnp.broadcast_to(self._kind(2) + self.position(jnp.zeros((), jnp.int32)),
                              (b, 1, history.shape[-1]))]  # [B, 1, D] the null token
    history_sees = [jnp.ones((b, l, 1), bool)]  # [B, L, 1]: the null token, always
    if self.rationales is not None:
      if users is None:
        raise ValueError("this model reads a rationale per user: pass `users` [B]")
      vectors = jnp.take(jnp.asarray(self.rationales.vectors), users, axis=0)  # [B, K, Dt]
      front.append(self.g_p(vectors) + self._kind(0)
                   + self.position(jnp.zeros((), jnp.int32)))  # [B, K, D]
      lengths = rationale_table.prefix_lengths(inputs, lengths)
      history_sees.append(rationale_table.visible(self.rationales, users, lengths))  # [B, L, K]
    front = jnp.concatenate(front, axis=1)  # [B, n, D], n = 1 + K
    n = front.shape[1]
    causal = jnp.tril(jnp.ones((l, l), bool))[None] & mask[:, None, :]  # [B, L, L]
    history_sees = jnp.concatenate(history_sees + [causal], axis=-1)  # [B, L, n + L]
    # Front tokens see the null token and themselves only: what a rationale token carries
    # is its own text, whoever reads it.
    front_sees = (jnp.eye(n, n + l, dtype=bool) | (jnp.arange(n + l) == 0))[None]  # [1, n, n+L]
    allowed = jnp.concatenate([jnp.broadcast_to(front_sees, (b, n, n + l)), history_sees],
                              axis=1)  # [B, n + L, n + L]
    x = jnp.concatenate([front, history], axis=1)  # [B, n + L, D]
    bias = jnp.where(allowed[:, None], 0.0, -10000.0).astype(x.dtype)
    out = self._run(x, bias, deterministic)[:, n:]  # [B, L, D]
    sequence = out if all_positions else out[:, -1]
    # score = <s, z> / sqrt(D). Both sides leave a LayerNorm with norm sqrt(D), and at
    # initialisation every item's vector points the same way (MiniLM's item texts share a
    # large common component), so the plain product started near D: about 38 for every
    # pair at D = 64 on MovieLens-100k, a BCE loss of about 12 on the first epoch, and
    # 90-184 epochs to converge. Scaled, the same cell reached a higher test NDCG@10 in
    # fewer epochs (docs/results/grid_speed.md).
    sequence = sequence * self.config.hidden_size ** -0.5
    return Representations(sequence=sequence, items=self.item_table(projected, deterministic))


# ----------------------------------------------------------------------------- variants

class Variant(NamedTuple):
  family: str  # 'id' (a backbone alone), 'id+' (fused item table), 'agnostic'
  source: str | None = None  # the rationale writer: 'teacher' or 'student'; None: no rationale
  step: str | None = None  # 'step1'..'step3': one step's text; None: the whole rationale
  shuffled: bool = False  # rationales shuffled between users (a control)

  def vector_names(self) -> tuple[str, ...]:
    """The slim_jax/encode.py outputs the variant reads: the evaluation and the training
    rationale (teacher/prompts.py KINDS), e.g. ('student_step1', 'student_train_step1')."""
    if self.source is None:
      return ()
    step = f"_{self.step}" if self.step else ""
    return (f"{self.source}{step}", f"{self.source}_train{step}")


VARIANTS = {
    "backbone": Variant("id"),
    "backbone+": Variant("id+"),
    "slim-": Variant("id+", "teacher"),
    "slim": Variant("id+", "student"),
    "slim-shuffled": Variant("id+", "student", shuffled=True),
    "agnostic": Variant("agnostic", "student"),
    "agnostic-history": Variant("agnostic"),
    "agnostic-step1": Variant("agnostic", "student", "step1"),
    "agnostic-step2": Variant("agnostic", "student", "step2"),
    "agnostic-step3": Variant("agnostic", "student", "step3"),
}
SHUFFLE_SEED = 0  # the derangement of slim-shuffled, the same for every training seed


def variant(name: str) -> Variant:
  if name not in VARIANTS:
    raise ValueError(f"unknown SLIM variant {name!r}; choose from {sorted(VARIANTS)}")
  return VARIANTS[name]


def is_id_agnostic(name: str) -> bool:
  return name in VARIANTS and VARIANTS[name].family == "agnostic"


def make_model(name: str, backbone_name: str, *, num_items: int,
               item_text: np.ndarray | None = None, rationales: RationaleTable | None = None,
               max_len: int = 50, hidden_size: int = 64, num_layers: int | None = None,
               num_heads: int | None = None, dropout: float | None = None) -> nn.Module:
  """The module of variant `name` ('backbone', 'slim', 'agnostic-step2', ...).

  ID-agnostic variants ignore `backbone_name`. item_text [V+1, Dt]; rationales: the
  variant's rationale table (its `vector_names`), unshuffled: 'slim-shuffled' shuffles it.
  """
  v = variant(name)
  if v.family != "id" and item_text is None:
    raise ValueError(f"variant {name!r} needs the item text vectors (embeddings/items.npy)")
  if v.source is not None and rationales is None:
    raise ValueError(f"variant {name!r} needs the rationale vectors embeddings/"
                     f"{' and '.join(n + '.npy' for n in v.vector_names())}")
  if v.source is None:
    rationales = None
  elif v.shuffled:
    rationales = rationales.shuffled(SHUFFLE_SEED)
  if item_text is not None and item_text.shape[0] != num_items + 1:
    raise ValueError(f"item text vectors have {item_text.shape[0]} rows, expected "
                     f"num_items + 1 = {num_items + 1}; re-run the encode stage")
  if v.family == "agnostic":
    cfg = IDAgnosticConfig(hidden_size=hidden_size, max_len=max_len,
                           num_layers=2 if num_layers is None else num_layers,
                           num_heads=2 if num_heads is None else num_heads,
                           dropout=0.2 if dropout is None else dropout)
    return SlimIDAgnostic(cfg, Frozen(item_text), rationales)
  net = registry.make_backbone(backbone_name, registry.make_config(
      backbone_name, num_items=num_items, max_len=max_len, hidden_size=hidden_size,
      num_layers=num_layers, num_heads=num_heads, dropout=dropout))
  if v.family == "id":
    return backbone_lib.Recommender(backbone=net)
  return SlimIDBased(net, Frozen(item_text), rationales)
