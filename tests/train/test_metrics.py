"""Ranking metrics against hand-computed cases, ties included."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.train import metrics


def _ndcg(rank):
  return 1.0 / math.log2(rank + 2) if rank < 10 else 0.0


def test_sampled_hand_computed():
  scores = jnp.array([
      [5.0, 1.0, 2.0, 3.0],  # best: rank 0
      [2.0, 3.0, 1.0, 0.0],  # one above: rank 1
      [1.0, 1.0, 0.0, 1.0],  # two ties: both rank above -> rank 2
      [0.0, 0.0, 0.0, 0.0],  # all tied: last, rank 3
  ])
  out = metrics.sampled_ranking_metrics(scores)
  np.testing.assert_allclose(out["ndcg@10"], [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5)],
                             rtol=1e-6)
  np.testing.assert_array_equal(out["hr@10"], [1, 1, 1, 1])
  np.testing.assert_array_equal(out["hr@20"], [1, 1, 1, 1])


def test_sampled_cutoffs_with_101_candidates():
  rng = np.random.default_rng(0)
  rows = []
  ranks = [0, 9, 10, 19, 20, 100]
  for rank in ranks:
    negatives = np.concatenate([rng.uniform(2, 3, rank), rng.uniform(-3, -2, 100 - rank)])
    rows.append(np.concatenate([[0.0], rng.permutation(negatives)]))
  out = jax.jit(metrics.sampled_ranking_metrics)(jnp.asarray(np.stack(rows), jnp.float32))
  np.testing.assert_allclose(out["ndcg@10"], [_ndcg(r) for r in ranks], rtol=1e-6)
  np.testing.assert_array_equal(out["hr@10"], [r < 10 for r in ranks])
  np.testing.assert_array_equal(out["hr@20"], [r < 20 for r in ranks])


def test_tie_at_the_cutoff_drops_the_hit():
  # 9 negatives above and one tied: rank 10, outside the top 10.
  scores = jnp.array([[1.0] + [2.0] * 9 + [1.0] + [0.0] * 90])
  out = metrics.sampled_ranking_metrics(scores)
  assert float(out["hr@10"][0]) == 0.0 and float(out["ndcg@10"][0]) == 0.0
  assert float(out["hr@20"][0]) == 1.0


def test_full_ranking_excludes_padding_and_history():
  # Items 0..5; target 3.
  scores = jnp.array([[9.0, 8.0, 7.0, 5.0, 6.0, 1.0],
                      [9.0, 8.0, 7.0, 5.0, 6.0, 1.0],
                      [9.0, 8.0, 7.0, 5.0, 5.0, 1.0]])
  targets = jnp.array([3, 3, 3])
  exclude = jnp.array([[False] * 6,
                       [False, True, True, False, False, False],  # history {1, 2}
                       [False, True, True, True, False, False]])  # target marked too
  out = metrics.full_ranking_metrics(scores, targets, exclude)
  # Row 0: 1, 2, 4 above (0 is padding) -> rank 3. Row 1: only 4 -> rank 1.
  # Row 2: the target is never excluded; item 4 ties -> rank 1.
  np.testing.assert_allclose(out["ndcg@10"], [_ndcg(3), _ndcg(1), _ndcg(1)], rtol=1e-6)
  np.testing.assert_array_equal(out["hr@10"], [1, 1, 1])


def test_full_matches_sampled_when_candidates_are_everything():
  rng = np.random.default_rng(1)
  scores = rng.normal(size=(16, 31)).astype(np.float32)
  scores[:, 5] = scores[:, 7]  # a tie somewhere
  targets = rng.integers(1, 31, size=16)
  exclude = np.zeros_like(scores, bool)
  full = jax.jit(metrics.full_ranking_metrics)(scores, targets, exclude)
  rows = []
  for b in range(16):
    others = [i for i in range(1, 31) if i != targets[b]]
    rows.append(np.concatenate([[scores[b, targets[b]]], scores[b, others]]))
  sampled = metrics.sampled_ranking_metrics(jnp.asarray(np.stack(rows)))
  for k in metrics.METRICS:
    np.testing.assert_allclose(full[k], sampled[k], rtol=1e-6)


def test_mean_std():
  out = metrics.mean_std([{"ndcg@10": 0.1, "hr@10": 0.5}, {"ndcg@10": 0.3, "hr@10": 0.7},
                          {"ndcg@10": 0.2, "hr@10": 0.6}])
  assert out["ndcg@10"]["mean"] == pytest.approx(0.2)
  assert out["ndcg@10"]["std"] == pytest.approx(0.1)  # sample std of .1, .2, .3
  assert out["hr@10"]["n"] == 3
  assert metrics.mean_std([{"hr@10": 0.4}])["hr@10"] == {"mean": 0.4, "std": 0.0, "n": 1}
