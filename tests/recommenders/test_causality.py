"""The causal rule for every variant (docs/causal_rationales.md): at every training position
t, the user-side representation is unchanged when the texts of the items after t and every
rationale written after t (cutoff > the items position t's history holds) are replaced by
random vectors.

The same check catches the model the project had before (issue 18): one rationale written
from the whole training prefix and read at every position. Measured on that code with this
kind of check: max |change| 0.0114 (slim/sasrec), 0.0158 (slim/gru4rec), 0.0275
(slim-/srgnn), 0.0103 (agnostic); see `test_the_check_catches_a_rationale_read_everywhere`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.recommenders import slim
from slim_jax.recommenders.rationale_table import RationaleTable
from slim_jax.recommenders.slim import Frozen

V, DT, L, B = 40, 12, 8, 3
# Row b is user b; every item occurs once in the whole batch, so "the items after t" are
# exactly the items at positions after t. Row 1 is a window that starts at the user's
# 6th item (lengths 6..13), as the batcher cuts long prefixes.
INPUTS = np.asarray([[0, 0, 1, 2, 3, 4, 5, 6],
                     [7, 8, 9, 10, 11, 12, 13, 14],
                     [0, 0, 0, 15, 16, 17, 18, 19]], np.int32)
OFFSETS = np.asarray([0, 5, 0])
LENGTHS = np.where(INPUTS > 0, np.cumsum(INPUTS > 0, axis=1) + OFFSETS[:, None], 0).astype(
    np.int32)
# Per user: a training rationale and an evaluation one (cutoffs inside and past each row).
CUTOFFS = np.asarray([[3, 7], [9, 14], [2, 6]])

# Every variant on SASRec and SLIM on every backbone in the fast suite; the other
# (variant, backbone) pairs are slow (-m slow).
_CASES = [(v, b) if b == "sasrec" or v == "slim" else pytest.param(v, b, marks=pytest.mark.slow)
          for v in slim.VARIANTS if not slim.is_id_agnostic(v)
          for b in ("gru4rec", "sasrec", "srgnn")] + [
              (v, "sasrec") for v in slim.VARIANTS if slim.is_id_agnostic(v)]


def _texts(seed: int = 0):
  rng = np.random.default_rng(seed)
  items = rng.normal(size=(V + 1, DT)).astype(np.float32)
  items[0] = 0
  return items, rng.normal(size=(B, 2, DT)).astype(np.float32)


def _table(vectors, cutoffs) -> RationaleTable:
  every = np.ones(B, bool)
  return RationaleTable.from_kinds([(vectors[:, k], every, cutoffs[:, k]) for k in range(2)])


def max_change(model, params, true_cutoffs) -> float:
  """The largest change of any real position's representation when the future is replaced;
  `true_cutoffs` [B, K] say which rationales were written after each position."""
  inputs, lengths = jnp.asarray(INPUTS), jnp.asarray(LENGTHS)
  users = jnp.arange(B, dtype=jnp.int32)

  def represent(m):
    return np.asarray(m.apply({"params": params}, inputs, users, lengths,
                              all_positions=True).sequence)  # [B, L, D]

  base = represent(model)
  worst = 0.0
  rng = np.random.default_rng(1)
  for t in range(L):
    changes = {}
    if hasattr(model, "item_text"):
      items = model.item_text.array.copy()
      future = INPUTS[:, t + 1:][INPUTS[:, t + 1:] > 0]
      items[future] = rng.normal(size=(len(future), DT))
      changes["item_text"] = Frozen(items)
    table = getattr(model, "rationales", None)
    if table is not None:
      written_after = true_cutoffs > LENGTHS[:, t:t + 1]  # [B, K]
      vectors = table.vectors.copy()
      vectors[written_after] = rng.normal(size=(int(written_after.sum()), DT))
      changes["rationales"] = RationaleTable(vectors, table.cutoffs)
    out = represent(model.clone(**changes)) if changes else base
    real = INPUTS[:, t] > 0
    worst = max(worst, float(np.abs(out[real, t] - base[real, t]).max(initial=0.0)))
  return worst


@pytest.mark.parametrize("variant,backbone", _CASES)
def test_no_position_reads_the_future(variant, backbone):
  items, vectors = _texts()
  table = _table(vectors, CUTOFFS)
  model = slim.make_model(variant, backbone, num_items=V, item_text=items, rationales=table,
                          max_len=L, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(INPUTS), jnp.arange(B),
                      jnp.asarray(LENGTHS))["params"]
  truth = getattr(model, "rationales", None)
  assert max_change(model, params, CUTOFFS if truth is None else truth.cutoffs) < 1e-5
  if getattr(model, "rationales", None) is not None:  # and the rationale is read at all
    later = model.clone(rationales=RationaleTable(truth.vectors + 1.0, truth.cutoffs))
    users, lengths = jnp.arange(B), jnp.asarray(LENGTHS)
    a = model.apply({"params": params}, jnp.asarray(INPUTS), users, lengths).sequence
    b = later.apply({"params": params}, jnp.asarray(INPUTS), users, lengths).sequence
    assert not np.allclose(a, b)


@pytest.mark.parametrize("variant,backbone", [("slim", "sasrec"), ("slim-", "srgnn"),
                                              ("agnostic", "sasrec")])
def test_the_check_catches_a_rationale_read_everywhere(variant, backbone):
  """The old model: rationales written after t (CUTOFFS) but readable from position 1."""
  items, vectors = _texts()
  leaky = _table(vectors, np.ones_like(CUTOFFS))
  model = slim.make_model(variant, backbone, num_items=V, item_text=items, rationales=leaky,
                          max_len=L, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(INPUTS), jnp.arange(B),
                      jnp.asarray(LENGTHS))["params"]
  assert max_change(model, params, np.sort(CUTOFFS, axis=1)) > 1e-3
