"""The sparsity analysis: train on a fraction of each user's training prefix.

  thin_training(data, fraction, seed)   each user's training prefix thinned to `fraction`
                                        (the validation and test targets stay)
  training_counts(data)                 [V + 1] interactions per item in training prefixes

slim_jax/data/prepare.py thins at preparation (`train_fraction`), so every later stage (the
teacher's and the student's rationales, the embeddings, the recommenders) works from the
thinned histories, and keeps the full data's training counts (FULL_COUNTS_FILE) so head
items and cold-start users are the same for every fraction.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slim_jax.data.dataset import SequenceDataset

FULL_COUNTS_FILE = "full_training_counts.npy"


def thin_training(data: SequenceDataset, fraction: float, seed: int = 0) -> SequenceDataset:
  """Keeps a random `fraction` (at least one) of each user's training prefix, in time order."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"--train_fraction must be in (0, 1], got {fraction}")
  rng = np.random.default_rng(seed)
  sequences, timestamps = [], []
  for seq, times in zip(data.sequences, data.timestamps):
    prefix = len(seq) - 2
    keep = max(1, int(round(fraction * prefix)))
    index = np.concatenate([np.sort(rng.choice(prefix, keep, replace=False)),
                            [prefix, prefix + 1]])
    sequences.append(seq[index])
    timestamps.append(times[index])
  return dataclasses.replace(data, sequences=sequences, timestamps=timestamps)


def training_counts(data: SequenceDataset) -> np.ndarray:
  counts = np.zeros(data.num_items + 1, np.int64)
  for user in range(data.num_users):
    np.add.at(counts, data.train_prefix(user), 1)
  return counts
