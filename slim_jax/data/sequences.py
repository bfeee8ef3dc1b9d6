"""Batches for training and candidate sets for evaluation, from a `SequenceDataset`.

Split (chronological leave-one-out): for a user with items x_1..x_n, the training prefix
is x_1..x_{n-2}, the validation target x_{n-1} and the test target x_n.

- `left_pad`: the most recent `max_len` items of each sequence, zeros in front.
- `sample_eval_negatives`: for every user and each of 'valid'/'test', `num_negatives`
  distinct items drawn uniformly from the items the user never interacted with (over the
  whole sequence, test item included). Drawn once, stored in negatives.npz, so every model
  and variant is ranked against the same candidates.
- `eval_set`: inputs (history before the target), candidates (target in column 0, then
  the stored negatives) and the per-user history for full-ranking exclusion.
- `TrainBatcher`: fixed-shape numpy batches over the training prefixes only. Every
  training transition (x_1..x_t -> x_{t+1}, t < n-2) appears exactly once per epoch: a
  prefix with more than max_len transitions is cut, from the most recent end, into windows
  of up to max_len transitions. Each position carries one sampled negative that is never
  an item of the user's training prefix (the items the model may see in training; the
  validation and test items are not excluded, or their absence would leak them), and its
  `lengths`: how many of the user's items the history up to it holds (the causal rule of
  docs/causal_rationales.md reads it).

Letters: U users, L max_len, B batch, C candidates, W windows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np

from slim_jax.data import dataset as dataset_lib
from slim_jax import io

NEGATIVES_FILE = "negatives.npz"
SPLITS = ("valid", "test")


def left_pad(sequences: Sequence[np.ndarray], max_len: int) -> np.ndarray:
  """[N, L] int32: each sequence's last `max_len` items, right-aligned, zeros in front."""
  out = np.zeros((len(sequences), max_len), np.int32)
  for row, seq in enumerate(sequences):
    tail = np.asarray(seq[-max_len:], np.int32) if len(seq) else np.zeros(0, np.int32)
    if len(tail):
      out[row, max_len - len(tail):] = tail
  return out


class _Interacted:
  """Membership of (user, item) pairs in users' sequences, vectorised."""

  def __init__(self, num_items: int, sequences: Sequence[np.ndarray]):
    self.stride = num_items + 1
    keys = [u * self.stride + np.asarray(s, np.int64) for u, s in enumerate(sequences)]
    self.keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    self.counts = np.asarray([len(np.unique(s)) for s in sequences], np.int64)

  def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Bool array, broadcast over users [...] and items [...]."""
    keys = np.asarray(users, np.int64) * self.stride + items
    pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
    return self.keys[pos] == keys


def _sample_rows(interacted: _Interacted, num_items: int, n: int,
                 rng: np.random.Generator) -> np.ndarray:
  """[U, n] int32: per user, n distinct items uniformly from the items never interacted.

  Rejection sampling, vectorised: an i.i.d. uniform stream with the user's items and
  repeats removed is a uniform draw without replacement from the rest.
  """
  num_users = len(interacted.counts)
  short = np.flatnonzero(num_items - interacted.counts < n)
  if len(short):
    raise ValueError(f"user {short[0]} interacted with {interacted.counts[short[0]]} of "
                     f"{num_items} items: fewer than {n} are left to sample negatives from; "
                     "lower num_negatives")
  out = np.zeros((num_users, n), np.int32)
  todo = np.arange(num_users)
  width = 2 * n + 16
  while len(todo):
    draws = rng.integers(1, num_items + 1, size=(len(todo), width))  # [u, width]
    rows = np.broadcast_to(np.arange(len(todo))[:, None], draws.shape)
    ok = ~interacted.contains(todo[:, None], draws)
    # First occurrence of each (row, item) in draw order.
    flat = (rows * (num_items + 1) + draws).ravel()
    _, first = np.unique(flat, return_index=True)
    is_first = np.zeros(flat.size, bool)
    is_first[first] = True
    ok &= is_first.reshape(draws.shape)
    enough = ok.sum(1) >= n
    take = np.argsort(~ok[enough], axis=1, kind="stable")[:, :n]  # first n good draws
    out[todo[enough]] = np.take_along_axis(draws[enough], take, axis=1)
    todo = todo[~enough]
    width *= 2
  return out


def sample_eval_negatives(dataset: dataset_lib.SequenceDataset, num_negatives: int = 100,
                          seed: int = 0) -> dict[str, np.ndarray]:
  """{'valid': [U, n], 'test': [U, n]} int32 negatives the user never interacted with."""
  rng = np.random.default_rng(seed)
  interacted = _Interacted(dataset.num_items, dataset.sequences)
  return {split: _sample_rows(interacted, dataset.num_items, num_negatives, rng)
          for split in SPLITS}


def save_negatives(directory: str, negatives: dict[str, np.ndarray]) -> None:
  """Writes negatives.npz atomically."""
  os.makedirs(directory, exist_ok=True)
  with io.atomic_open(os.path.join(directory, NEGATIVES_FILE), "wb") as f:
    np.savez(f, **{k: np.asarray(v, np.int32) for k, v in negatives.items()})


def load_negatives(directory: str) -> dict[str, np.ndarray]:
  path = os.path.join(directory, NEGATIVES_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run experiments/prepare_data.py with "
                            "this --workdir first")
  with np.load(path) as data:
    missing = [s for s in SPLITS if s not in data.files]
    if missing:
      raise ValueError(f"{path} lacks {missing}; delete it and prepare the data again")
    return {s: data[s].astype(np.int32) for s in SPLITS}


@dataclasses.dataclass
class EvalSet:
  """Everything needed to rank one split's targets, row u for user users[u]."""

  users: np.ndarray  # [U] int32
  inputs: np.ndarray  # [U, L] int32, history before the target, left-padded
  candidates: np.ndarray  # [U, 1 + n] int32, column 0 the held-out item
  seen: list[np.ndarray]  # per user: items of the whole input history (not cut to L)
  lengths: np.ndarray  # [U, L] int32, how many user items the history up to each input holds

  @property
  def targets(self) -> np.ndarray:
    return self.candidates[:, 0]

  def __len__(self) -> int:
    return len(self.users)

  def rows(self, index: np.ndarray) -> "EvalSet":
    """The subset of rows `index`."""
    index = np.asarray(index, np.int64)
    return EvalSet(users=self.users[index], inputs=self.inputs[index],
                   candidates=self.candidates[index], seen=[self.seen[i] for i in index],
                   lengths=self.lengths[index])

  def exclude_mask(self, num_items: int, start: int = 0, stop: int | None = None
                   ) -> np.ndarray:
    """[b, V + 1] bool for rows start:stop: padding 0 and each user's history items."""
    rows = self.seen[start:stop]
    mask = np.zeros((len(rows), num_items + 1), bool)
    mask[:, 0] = True
    for r, items in enumerate(rows):
      mask[r, items] = True
    return mask


def eval_set(dataset: dataset_lib.SequenceDataset, split: str,
             negatives: dict[str, np.ndarray], max_len: int) -> EvalSet:
  """Inputs and candidates for 'valid' (history: train prefix) or 'test' (prefix + valid)."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  cut = 2 if split == "valid" else 1
  histories = [s[:-cut] for s in dataset.sequences]
  targets = np.asarray([s[-cut] for s in dataset.sequences], np.int32)
  negs = np.asarray(negatives[split], np.int32)
  if negs.shape[0] != dataset.num_users:
    raise ValueError(f"negatives['{split}'] has {negs.shape[0]} rows for "
                     f"{dataset.num_users} users; prepare the data again")
  return EvalSet(users=np.arange(dataset.num_users, dtype=np.int32),
                 inputs=left_pad(histories, max_len),
                 candidates=np.concatenate([targets[:, None], negs], axis=1),
                 seen=[np.unique(h).astype(np.int32) for h in histories],
                 lengths=left_pad([np.arange(1, len(h) + 1) for h in histories], max_len))


class TrainBatcher:
  """Fixed-shape training batches of windows over the users' training prefixes."""

  def __init__(self, dataset: dataset_lib.SequenceDataset, max_len: int, batch_size: int,
               seed: int = 0):
    self.max_len, self.batch_size, self.seed = max_len, batch_size, seed
    self.num_items = dataset.num_items
    prefixes = [dataset.train_prefix(u) for u in range(dataset.num_users)]
    self._interacted = _Interacted(dataset.num_items, prefixes)
    full = np.flatnonzero(self._interacted.counts >= self.num_items)
    if len(full):
      raise ValueError(f"user {full[0]}'s training prefix holds every item: no negative to "
                       "sample")
    lengths = np.asarray([len(p) for p in prefixes], np.int64)
    self._flat = (np.concatenate(prefixes).astype(np.int32) if prefixes
                  else np.zeros(0, np.int32))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    transitions = np.maximum(lengths - 1, 0)  # [U]
    per_user = -(-transitions // max_len)  # windows per user
    users = np.repeat(np.arange(len(lengths)), per_user)  # [W]
    k = np.arange(len(users)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    end = transitions[users] - k * max_len  # exclusive end of the window's input positions
    begin = np.maximum(end - max_len, 0)
    self._users = users.astype(np.int32)
    self._offsets = offsets.astype(np.int64)  # [U] into _flat
    self._begin = (offsets[users] + begin).astype(np.int64)  # into _flat
    self._length = (end - begin).astype(np.int64)
    self.num_windows = len(users)
    self.num_transitions = int(transitions.sum())

  @property
  def num_batches(self) -> int:
    return -(-self.num_windows // self.batch_size)

  def _negatives(self, users: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """[B, L] one item per valid position, never in that user's training prefix; 0 elsewhere."""
    negs = rng.integers(1, self.num_items + 1, size=mask.shape).astype(np.int32)
    bad = mask & self._interacted.contains(users[:, None], negs)
    while bad.any():
      rows, cols = np.nonzero(bad)
      negs[rows, cols] = rng.integers(1, self.num_items + 1, size=len(rows))
      bad[rows, cols] = self._interacted.contains(users[rows], negs[rows, cols])
    return np.where(mask, negs, 0)

  def epoch(self, index: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of epoch `index`: inputs, targets, negatives, lengths [B, L], users [B]."""
    rng = np.random.default_rng([self.seed, index])
    order = rng.permutation(self.num_windows)
    b, length = self.batch_size, self.max_len
    cols = np.arange(length)
    for start in range(0, self.num_windows, b):
      windows = order[start:start + b]
      n = len(windows)
      lens = self._length[windows]  # [n]
      offset = cols[None, :] - (length - lens[:, None])  # [n, L], < 0 on padding
      mask = np.zeros((b, length), bool)
      mask[:n] = offset >= 0
      position = np.zeros((b, length), np.int64)
      position[:n] = self._begin[windows][:, None] + np.maximum(offset, 0)
      inputs = np.where(mask, self._flat[position], 0).astype(np.int32)
      targets = np.where(mask, self._flat[np.minimum(position + 1, len(self._flat) - 1)],
                         0).astype(np.int32)
      users = np.zeros(b, np.int32)
      users[:n] = self._users[windows]
      lengths = np.where(mask, position + 1 - self._offsets[users][:, None], 0).astype(np.int32)
      yield {"inputs": inputs, "targets": targets,
             "negatives": self._negatives(users, mask, rng), "lengths": lengths,
             "users": users}
