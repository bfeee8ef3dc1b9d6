"""SLIM fusion models: shapes of every variant, text-only item scoring, learning."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
from planted import planted_dataset  # noqa: E402
from slim_jax.data import sequences  # noqa: E402
from slim_jax.recommenders import slim  # noqa: E402
from slim_jax.recommenders.rationale_table import RationaleTable  # noqa: E402
from slim_jax.train import loop  # noqa: E402

V, U, DT, L = 30, 12, 24, 8


def table(num_users, dim, rng, cutoff=1):
  """Two kinds of rationale per user, both visible from the first position on."""
  vectors = rng.normal(size=(2, num_users, dim)).astype(np.float32)
  every = np.ones(num_users, bool)
  return RationaleTable.from_kinds([(vectors[0], every, np.full(num_users, cutoff)),
                                    (vectors[1], every, np.full(num_users, cutoff + 1))])


def _text(seed=0):
  rng = np.random.default_rng(seed)
  items = rng.normal(size=(V + 1, DT)).astype(np.float32)
  items[0] = 0
  return items, table(U, DT, rng)


def _model(variant, backbone="sasrec", items=None, users=None):
  if items is None:
    items, users = _text()
  return slim.make_model(variant, backbone, num_items=V, item_text=items, rationales=users,
                         max_len=L, hidden_size=16, num_layers=1, num_heads=2, dropout=0.1)


_CASES = [(v, "sasrec") for v in sorted(slim.VARIANTS)] + [
    ("slim", "gru4rec"), ("backbone+", "srgnn"), ("slim", "srgnn")]


@pytest.mark.parametrize("variant,backbone", _CASES)
def test_shapes_of_every_variant(variant, backbone):
  model = _model(variant, backbone)
  inputs = jnp.asarray([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]], jnp.int32)
  users = jnp.asarray([0, 5], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), inputs, users)["params"]
  last = model.apply({"params": params}, inputs, users)
  every = model.apply({"params": params}, inputs, users, all_positions=True)
  assert last.sequence.shape == (2, 16) and last.items.shape == (V + 1, 16)
  assert every.sequence.shape == (2, L, 16)
  np.testing.assert_allclose(every.sequence[:, -1], last.sequence, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(last.items[0]), 0)  # padding row
  if slim.variant(variant).source is not None:  # the rationale changes the user vector
    other = model.apply({"params": params}, inputs, jnp.asarray([1, 2], jnp.int32))
    assert not np.allclose(other.sequence, last.sequence)


def test_text_vectors_are_not_parameters():
  model = _model("slim")
  inputs = jnp.ones((2, L), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), inputs, jnp.zeros(2, jnp.int32))["params"]
  sizes = [x.size for x in jax.tree.leaves(params)]
  assert (V + 1) * DT not in sizes and U * DT not in sizes and 2 * U * DT not in sizes


def test_id_agnostic_scores_items_by_text_alone():
  items, users = _text()
  unseen = V  # never in any input: only its text exists
  items[unseen] = items[4]  # same text as item 4
  model = _model("agnostic", items=items, users=users)
  inputs = jnp.asarray([[0, 0, 1, 2, 3, 5, 6, 7]], jnp.int32)
  params = model.init(jax.random.PRNGKey(1), inputs, jnp.zeros(1, jnp.int32))["params"]
  reps = model.apply({"params": params}, inputs, jnp.zeros(1, jnp.int32))
  scores = np.asarray(reps.sequence @ reps.items.T)[0]
  assert np.isclose(scores[unseen], scores[4], atol=1e-5)  # identical text, identical score
  assert not np.isclose(scores[unseen], scores[9])
  # Changing the unseen item's text changes its score: it is represented by its text.
  items2 = items.copy()
  items2[unseen] = items[9]
  reps2 = _model("agnostic", items=items2, users=users).apply({"params": params}, inputs,
                                                             jnp.zeros(1, jnp.int32))
  assert np.isclose(np.asarray(reps2.sequence @ reps2.items.T)[0, unseen], scores[9], atol=1e-5)
  # An ID-based model cannot do this: the same text gives different scores.
  idb = _model("slim", items=items, users=users)
  p = idb.init(jax.random.PRNGKey(1), inputs, jnp.zeros(1, jnp.int32))["params"]
  r = idb.apply({"params": p}, inputs, jnp.zeros(1, jnp.int32))
  s = np.asarray(r.sequence @ r.items.T)[0]
  assert not np.isclose(s[unseen], s[4], atol=1e-6)


def test_bad_inputs_are_rejected():
  items, users = _text()
  with pytest.raises(ValueError, match="unknown SLIM variant"):
    slim.make_model("slim++", "sasrec", num_items=V, item_text=items, rationales=users)
  with pytest.raises(ValueError, match="embeddings/student.npy and student_train.npy"):
    slim.make_model("slim", "sasrec", num_items=V, item_text=items)
  with pytest.raises(ValueError, match="re-run the encode stage"):
    slim.make_model("backbone+", "sasrec", num_items=V + 3, item_text=items)


def test_id_agnostic_scores_start_below_sqrt_d():
  """At initialisation the ID-agnostic model's scores are at most about sqrt(D), not D.
  Both sides leave a LayerNorm (norm sqrt(D)), and item texts that share a common component
  (MiniLM's MovieLens item vectors: mean cosine 0.43) point every item the same way, so the
  plain product <s, z> started near D for every pair: about 38 at D = 64 on MovieLens-100k,
  a first-epoch BCE loss of 12 and 90-184 epochs to converge. Scaled by 1/sqrt(D), the
  same cell converged sooner and higher (docs/results/grid_speed.md)."""
  rng = np.random.default_rng(0)
  hidden, dim = 64, 48
  common = rng.normal(size=dim)
  items = (common + rng.normal(size=(V + 1, dim))).astype(np.float32)  # mean cosine ~0.5
  items[0] = 0
  model = slim.make_model("agnostic", "sasrec", num_items=V, item_text=items,
                          rationales=table(U, dim, rng), max_len=L, hidden_size=hidden,
                          dropout=0.0)
  inputs = jnp.asarray(rng.integers(1, V + 1, (U, L)), jnp.int32)
  users = jnp.arange(U)
  params = model.init(jax.random.PRNGKey(0), inputs, users, all_positions=True)["params"]
  reps = model.apply({"params": params}, inputs, users, all_positions=True)
  scores = jnp.einsum("bld,vd->blv", reps.sequence, reps.items[1:])  # [U, L, V]
  # Unscaled, this case gives about 40; scaled, about sqrt(D) times the cosine.
  assert float(jnp.mean(jnp.abs(scores))) < hidden ** 0.5


@pytest.mark.parametrize("variant,backbone", [
    ("slim", "gru4rec"), pytest.param("agnostic", "sasrec", marks=pytest.mark.slow)])
def test_fused_model_learns_planted_structure(tmp_path, variant, backbone):
  data = planted_dataset(num_users=120, num_items=150)
  rng = np.random.default_rng(0)
  items = rng.normal(size=(data.num_items + 1, 32)).astype(np.float32)
  items[0] = 0
  model = slim.make_model(variant, backbone, num_items=data.num_items, item_text=items,
                          rationales=table(data.num_users, 32, rng), max_len=20, hidden_size=32, num_layers=1,
                          dropout=0.1)
  negatives = sequences.sample_eval_negatives(data, 100, seed=0)
  config = loop.TrainConfig(loss="bce", epochs=12, batch_size=32, learning_rate=5e-3,
                            patience=3, eval_batch_size=64, max_len=20, progress=False)
  result = loop.train_and_evaluate(model, data, negatives, config, str(tmp_path),
                                   log=lambda *_: None)
  # Random ranking against 100 negatives: NDCG@10 about 0.045 (measured here: slim-gru4rec
  # about 0.3, the ID-agnostic model about 0.1 after 12 epochs).
  assert result["test"]["ndcg@10"] > 0.08, result["test"]


def test_backbone_plus_reads_the_item_text_in_the_encoder():
  """backbone+ is the item feature extension: the fused table is the encoder's input too."""
  items, users = _text()
  inputs = jnp.asarray([[0, 0, 3, 4, 5, 6, 7, 8]], jnp.int32)
  model = _model("backbone+", items=items, users=users)
  params = model.init(jax.random.PRNGKey(0), inputs)["params"]
  before = model.apply({"params": params}, inputs)
  changed = items.copy()
  changed[5] = np.random.default_rng(7).normal(size=DT)  # an input item's text only
  after = _model("backbone+", items=changed, users=users).apply({"params": params}, inputs)
  assert not np.allclose(before.sequence, after.sequence)
  assert "null_rationale" not in params  # no user text at all


def test_a_missing_rationale_reads_the_learned_null_vector():
  rng = np.random.default_rng(3)
  vectors = rng.normal(size=(3, DT)).astype(np.float32)
  rationales = RationaleTable.from_kinds([
      (vectors, np.asarray([False, True, True]), np.asarray([0, L + 5, 2]))])
  items, _ = _text()
  model = _model("slim", items=items, users=rationales)
  inputs = jnp.asarray([[0, 0, 3, 4, 5, 6, 7, 8]] * 3, jnp.int32)
  users = jnp.arange(3, dtype=jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), inputs, users)["params"])
  out = np.asarray(model.apply({"params": params}, inputs, users).sequence)
  # user 0 has none, user 1's is written after the history ends: both read the null vector.
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)
  assert not np.allclose(out[0], out[2])  # user 2 reads its own
  null = params["null_rationale"]
  params["null_rationale"] = null + 1.0
  moved = np.asarray(model.apply({"params": params}, inputs, users).sequence)
  assert not np.allclose(moved[0], out[0]) and np.allclose(moved[2], out[2], atol=1e-6)


def test_shuffled_control_reads_another_users_rationale():
  rng = np.random.default_rng(4)
  rationales = table(U, DT, rng)
  shuffled = rationales.shuffled(0)
  for u in range(U):
    assert not np.allclose(shuffled.vectors[u], rationales.vectors[u])
    assert any(np.allclose(shuffled.vectors[u], rationales.vectors[v]) for v in range(U))
  np.testing.assert_array_equal(shuffled.cutoffs, rationales.cutoffs)
