"""Ranking metrics of the paper's protocol: NDCG@10, HR@10, HR@20, per example.

The rank of the held-out item is the number of other candidates that score at least as
high as it (0-based): a tie with a negative ranks the positive below that negative, so a
model that scores everything equally gets no credit. HR@k = [rank < k];
NDCG@k = 1 / log2(rank + 2) when rank < k, else 0 (one relevant item, so IDCG = 1).

`sampled_ranking_metrics` ranks against the stored candidates (positive in column 0);
`full_ranking_metrics` ranks against every item, never counting padding (0) or excluded
items (the user's history). Both are pure jnp functions, meant to run inside a jitted
evaluation step; `mean_std` summarises the per-seed results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

METRICS = ("ndcg@10", "hr@10", "hr@20")


def metrics_from_rank(rank: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """Per-example metrics from 0-based ranks [B]."""
  rank = rank.astype(jnp.float32)
  return {
      "ndcg@10": jnp.where(rank < 10, 1.0 / jnp.log2(rank + 2.0), 0.0),
      "hr@10": (rank < 10).astype(jnp.float32),
      "hr@20": (rank < 20).astype(jnp.float32),
  }


def sampled_ranking_metrics(scores: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """scores [B, C], the positive in column 0 -> per-example metrics, each [B]."""
  positive = scores[:, :1]  # [B, 1]
  rank = jnp.sum(scores[:, 1:] >= positive, axis=1)  # [B]
  return metrics_from_rank(rank)


def full_ranking_metrics(scores: jnp.ndarray, targets: jnp.ndarray,
                         exclude: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """scores [B, V + 1] over all item ids, targets [B], exclude [B, V + 1] bool -> [B] each.

  Item 0 (padding) and excluded items never outrank the target; the target itself is
  never excluded.
  """
  ids = jnp.arange(scores.shape[1])[None, :]  # [1, V + 1]
  is_target = ids == targets[:, None]  # [B, V + 1]
  positive = jnp.take_along_axis(scores, targets[:, None], axis=1)  # [B, 1]
  competes = ~exclude & (ids != 0) & ~is_target
  rank = jnp.sum(competes & (scores >= positive), axis=1)  # [B]
  return metrics_from_rank(rank)


def sample_std(values: Sequence[float]) -> float:
  """The sample standard deviation (ddof=1) of runs such as seeds; 0 for a single run."""
  values = np.asarray(values, np.float64)
  return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def mean_std(results: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
  """{metric: {'mean', 'std', 'n'}} over runs (e.g. seeds); std is the sample std (ddof=1),
  0 for a single run. Metrics missing from some runs are summarised over the others."""
  keys = []
  for r in results:
    keys.extend(k for k in r if k not in keys)
  out = {}
  for k in keys:
    values = np.asarray([float(r[k]) for r in results if k in r], np.float64)
    out[k] = {"mean": float(values.mean()),
              "std": sample_std(values),
              "n": int(len(values))}
  return out
