"""The paper's extra analyses of trained recommenders: sparsity, popularity bias, cold start.

  thin_training(data, fraction, seed)   each user's training prefix thinned to `fraction`
                                        (sparsity: train on fewer interactions; the valid
                                        and test targets stay)
  training_counts(data)                 [V + 1] interactions per item in training prefixes
  head_items(counts, share)             [V + 1] bool: the most popular items, `share` of them
  cold_users(data, counts, max_count)   test users whose held-out item has <= max_count
                                        training interactions
  user_analysis(model, params, ...)     per test user: the sampled-ranking metrics and the
                                        full-ranking top-k (seen items excluded)

slim_jax/train/grid.py keeps each test user's metrics and head@10; slim_jax/claims.py and
slim_jax/report.py summarise them. Popularity bias is the share of the top-10 (ranked over
every unseen item) that are head items; a model leaning on popularity recommends more of them than the backbone. Cold start
compares models on the users whose held-out item was rarely seen in training: the ID
embeddings of such items are barely trained, the text vectors are not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from slim_jax.data.dataset import SequenceDataset
from slim_jax.data.sparsity import thin_training, training_counts  # noqa: F401 (re-exported)
from slim_jax.data.sequences import EvalSet
from slim_jax.recommenders import backbone
from slim_jax.train import metrics

TOP_K = 10


def head_items(counts: np.ndarray, share: float = 0.2) -> np.ndarray:
  """The ceil(share * V) most interacted items (ties broken by id); padding 0 is never head."""
  num_items = len(counts) - 1
  order = np.argsort(-counts[1:], kind="stable") + 1
  head = np.zeros(len(counts), bool)
  head[order[:int(np.ceil(share * num_items))]] = True
  return head


def cold_users(data: SequenceDataset, counts: np.ndarray, max_count: int) -> np.ndarray:
  """Users whose test item has at most `max_count` training interactions."""
  targets = np.asarray([data.test_target(u) for u in range(data.num_users)])
  return np.flatnonzero(counts[targets] <= max_count)


def user_analysis(model, params, test: EvalSet, num_items: int, *, batch_size: int = 256,
                  k: int = TOP_K) -> dict[str, np.ndarray]:
  """Per test user: sampled metrics {name: [U]} and "top" [U, k], seen items excluded."""

  @jax.jit
  def score(inputs, users, lengths, candidates, exclude):
    reps = model.apply({"params": params}, inputs, users, lengths, deterministic=True,
                       all_positions=False)
    sampled = metrics.sampled_ranking_metrics(
        backbone.score_candidates(reps.sequence, reps.items, candidates))
    full = jnp.where(exclude, -jnp.inf, backbone.score_all(reps.sequence, reps.items))
    return sampled, jax.lax.top_k(full, k)[1]  # [B], [B, k]

  parts = []
  for start in range(0, len(test), batch_size):
    stop = min(start + batch_size, len(test))
    pad = batch_size - (stop - start)
    rows = lambda x: np.concatenate([x[start:stop], np.zeros((pad,) + x.shape[1:], x.dtype)])  # noqa: E731
    exclude = np.ones((batch_size, num_items + 1), bool)
    exclude[:stop - start] = test.exclude_mask(num_items, start, stop)
    sampled, top = jax.device_get(score(rows(test.inputs), rows(test.users),
                                        rows(test.lengths), rows(test.candidates), exclude))
    parts.append(({m: v[:stop - start] for m, v in sampled.items()}, top[:stop - start]))
  out = {m: np.concatenate([p[0][m] for p in parts]) for m in parts[0][0]}
  out["top"] = np.concatenate([p[1] for p in parts])
  return out
