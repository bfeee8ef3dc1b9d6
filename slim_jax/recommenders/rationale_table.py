"""Which rationale a position may read: the causal rule of docs/causal_rationales.md.

A user's rationale k was written from the first `cutoff[u, k]` items of the training prefix.
The position holding the user's n-th item (its history x_1..x_n, `lengths` = n) may read
rationale k only when cutoff[u, k] <= n: no text about an item reaches a position that
predicts that item or an earlier one. Each user has K rationales (the training one, written
up to a cutoff inside the training prefix, and the evaluation one, written from the whole
prefix); a position reads the latest it may see, and a learned null vector when it may see
none. A missing rationale (the teacher wrote none for the user) has cutoff NEVER.

  table = RationaleTable.from_kinds([(vectors [U, Dt], present [U], cutoffs [U]), ...])
  visible(table, users [B], lengths [B, L]) -> [B, L, K] bool
  read(table, users, lengths, null [Dt])    -> [B, L, Dt]  (project=: [B, L, D])

Letters: U users, K rationales per user, B batch, L positions, Dt text vector size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from slim_jax.recommenders.backbone import padding_mask

NEVER = np.iinfo(np.int32).max  # the cutoff of a missing rationale: no position sees it


class ModuleConstant:
  """A numpy payload a flax module carries as a field: hashed and compared by identity (a
  module's fields must hash; arrays do not), never a parameter."""

  def __hash__(self) -> int:
    return id(self)

  def __eq__(self, other) -> bool:
    return self is other


class RationaleTable(ModuleConstant):
  """Frozen per-user rationale vectors [U, K, Dt] and cutoffs [U, K], K sorted by cutoff.

  A constant of the module that holds it (hashed by identity, never a parameter)."""

  def __init__(self, vectors: np.ndarray, cutoffs: np.ndarray):
    vectors, cutoffs = np.asarray(vectors, np.float32), np.asarray(cutoffs, np.int64)
    if vectors.ndim != 3 or cutoffs.shape != vectors.shape[:2]:
      raise ValueError(f"RationaleTable: vectors {vectors.shape} must be [U, K, Dt] and "
                       f"cutoffs {cutoffs.shape} [U, K]")
    order = np.argsort(cutoffs, axis=1, kind="stable")  # latest visible = highest index
    self.vectors = np.take_along_axis(vectors, order[..., None], axis=1)
    self.cutoffs = np.take_along_axis(cutoffs, order, axis=1).astype(np.int32)

  @classmethod
  def from_kinds(cls, kinds: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> "RationaleTable":
    """One (vectors [U, Dt], present [U] bool, cutoffs [U] int) per kind of rationale."""
    if not kinds:
      raise ValueError("RationaleTable needs at least one kind of rationale")
    vectors = np.stack([np.asarray(v, np.float32) for v, _, _ in kinds], axis=1)
    cutoffs = np.stack([np.where(np.asarray(p, bool), np.asarray(c, np.int64), NEVER)
                        for _, p, c in kinds], axis=1)
    bad = (cutoffs < 1) & (cutoffs != NEVER)
    if bad.any():
      u, k = np.argwhere(bad)[0]
      raise ValueError(f"user {u}: rationale kind {k} has cutoff {cutoffs[u, k]}; a present "
                       "rationale is written from at least one item (re-run the encode stage)")
    return cls(vectors, cutoffs)

  @property
  def num_users(self) -> int:
    return self.vectors.shape[0]

  @property
  def present(self) -> np.ndarray:
    """[U, K] bool."""
    return self.cutoffs != NEVER

  def shuffled(self, seed: int = 0) -> "RationaleTable":
    """User u reads the rationales of user perm[u], a seeded derangement (no one keeps
    their own), at u's own cutoffs (where u has that rationale): the shuffled control."""
    u = self.num_users
    rng = np.random.default_rng(seed)
    perm = np.arange(u)
    if u > 1:
      perm = rng.permutation(u)
      while (perm == np.arange(u)).any():  # expected about e tries
        perm = rng.permutation(u)
    cutoffs = np.where(self.present & self.present[perm], self.cutoffs, NEVER)
    return RationaleTable(self.vectors[perm], cutoffs)

  def __repr__(self) -> str:
    return f"RationaleTable(users={self.num_users}, kinds={self.vectors.shape[1]})"


def prefix_lengths(inputs: jnp.ndarray, lengths: jnp.ndarray | None = None) -> jnp.ndarray:
  """[B, L]: how many of the user's items the history up to each position holds (0 on
  padding). `lengths` as given by the batcher (a window may start mid-sequence); None
  counts within the row, which is exact when the whole sequence fits in it."""
  if lengths is not None:
    return lengths
  mask = padding_mask(inputs)
  return jnp.cumsum(mask, axis=1) * mask


def visible(table: RationaleTable, users: jnp.ndarray, lengths: jnp.ndarray) -> jnp.ndarray:
  """users [B], lengths [B, L] -> [B, L, K]: may the position read rationale k."""
  cutoffs = jnp.take(jnp.asarray(table.cutoffs), users, axis=0)  # [B, K]
  return (cutoffs[:, None, :] <= lengths[..., None]) & (lengths[..., None] > 0)


def read(table: RationaleTable, users: jnp.ndarray, lengths: jnp.ndarray,
         null: jnp.ndarray, project: Callable[[jnp.ndarray], jnp.ndarray] | None = None
         ) -> jnp.ndarray:
  """users [B], lengths [B, L], null [Dt] -> [B, L, Dt]: the latest visible rationale.

  project: a map of text vectors [..., Dt] -> [..., D] applied to the user's K vectors and
  the null vector before choosing (-> [B, L, D]): what projecting the chosen [B, L, Dt]
  gives, for the price of K rows per user instead of L."""
  if users is None:
    raise ValueError("this model reads a rationale per user: pass `users` [B]")
  vectors = jnp.take(jnp.asarray(table.vectors), users, axis=0)  # [B, K, Dt]
  if project is not None:
    vectors, null = project(vectors), project(null)  # [B, K, D], [D]
  seen = visible(table, users, lengths)  # [B, L, K]
  k = vectors.shape[1]
  latest = jnp.max(jnp.where(seen, jnp.arange(k), -1), axis=-1)  # [B, L], -1: none
  pick = (jnp.arange(k) == latest[..., None]).astype(vectors.dtype)  # [B, L, K] one-hot
  chosen = jnp.einsum("blk,bkd->bld", pick, vectors)  # [B, L, Dt or D]
  return jnp.where((latest >= 0)[..., None], chosen, null.astype(chosen.dtype))
