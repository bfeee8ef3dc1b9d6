"""A small in-memory dataset with planted sequential structure, for the training tests.

Items 1..V sit on one cycle; each user walks it (item i is followed by i + 1 with
probability `follow`, else by a random item), so the next item is predictable from the
last one. A working recommender ranks it far above random (NDCG@10 with 100 negatives:
about 0.045 for a random ranking).
"""

import numpy as np

from slim_jax.data.dataset import Item, SequenceDataset


def planted_dataset(num_users: int = 160, num_items: int = 150, length: tuple = (8, 20),
                    follow: float = 0.95, seed: int = 0) -> SequenceDataset:
  rng = np.random.default_rng(seed)
  items = [Item(item_id=i, raw_id=f"i{i}", title=f"item {i}", brand="", categories=(),
                text=f"item {i}") for i in range(1, num_items + 1)]
  sequences, timestamps = [], []
  for _ in range(num_users):
    n = int(rng.integers(length[0], length[1] + 1))
    seq = [int(rng.integers(1, num_items + 1))]
    while len(seq) < n:
      nxt = seq[-1] % num_items + 1 if rng.random() < follow else int(
          rng.integers(1, num_items + 1))
      if nxt in seq:  # keep sequences repeat-free, like ml-100k
        nxt = next(i for i in range(1, num_items + 1) if i not in seq)
      seq.append(nxt)
    sequences.append(np.asarray(seq, np.int32))
    timestamps.append(np.arange(n, dtype=np.int64) * 100)
  return SequenceDataset(items=items, user_raw_ids=[f"u{u}" for u in range(num_users)],
                         sequences=sequences, timestamps=timestamps, name="planted")
