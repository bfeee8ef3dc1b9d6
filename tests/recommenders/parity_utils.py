"""Helpers shared by the backbone parity tests: random sequences in both paddings."""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))


def random_sequences(rng: np.random.Generator, batch: int, max_len: int, num_items: int,
                     repeats: bool = True):
  """Returns (left [B, L], right [B, L], lengths [B]) with lengths 1..L (one full row)."""
  lengths = rng.integers(1, max_len + 1, size=batch)
  lengths[0] = max_len
  left = np.zeros((batch, max_len), np.int32)
  right = np.zeros((batch, max_len), np.int32)
  for b, n in enumerate(lengths):
    if repeats:
      seq = rng.integers(1, num_items + 1, size=n)
      if n >= 4:  # plant a repeat and a self-loop so the session graph has both
        seq[2] = seq[0]
        seq[3] = seq[2]
    else:
      seq = rng.choice(np.arange(1, num_items + 1), size=n, replace=False)
    left[b, max_len - n:] = seq
    right[b, :n] = seq
  return left, right, lengths


def t(x) -> torch.Tensor:
  return torch.tensor(np.asarray(x), dtype=torch.float32)
