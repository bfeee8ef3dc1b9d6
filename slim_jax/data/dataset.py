"""The prepared dataset: an item table and per-user chronological sequences.

Every loader (Amazon, MovieLens, synthetic) produces a `SequenceDataset`; every later stage
(recommenders, teacher prompts, encoding) reads one. On disk it is a folder:

  items.jsonl        one item per line: item_id, raw_id, title, brand, categories, text
  users.jsonl        one user per line: user_id, raw_id, items, timestamps (time order)
  data_summary.json  counts and what was skipped (written by experiments/prepare_data.py)

Item ids are dense, 1..num_items; 0 is padding. User ids are dense, 0..num_users-1.
The split is chronological leave-one-out: the last item is the test target, the
second-to-last the validation target, the rest the training prefix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from slim_jax import io

ITEMS_FILE = "items.jsonl"
USERS_FILE = "users.jsonl"
SUMMARY_FILE = "data_summary.json"


@dataclasses.dataclass(frozen=True)
class Item:
  item_id: int  # dense id, 1..num_items
  raw_id: str  # id in the source files (ASIN, MovieLens id)
  title: str
  brand: str
  categories: tuple[str, ...]
  text: str  # the description f_i that the text encoder reads


@dataclasses.dataclass
class SequenceDataset:
  """Items and chronological user sequences; `items[i]` has item_id i + 1."""

  items: list[Item]
  user_raw_ids: list[str]
  sequences: list[np.ndarray]  # per user: int32 item ids in time order, length >= 3
  timestamps: list[np.ndarray]  # per user: int64 unix seconds, non-decreasing
  name: str = ""

  def __post_init__(self):
    for index, item in enumerate(self.items):
      if item.item_id != index + 1:
        raise ValueError(f"item at position {index} has item_id {item.item_id}; "
                         f"expected {index + 1} (ids are dense, 1-based)")
    if not (len(self.user_raw_ids) == len(self.sequences) == len(self.timestamps)):
      raise ValueError("user_raw_ids, sequences and timestamps differ in length")

  @property
  def num_items(self) -> int:
    return len(self.items)

  @property
  def num_users(self) -> int:
    return len(self.sequences)

  @property
  def num_interactions(self) -> int:
    return int(sum(len(s) for s in self.sequences))

  def train_prefix(self, user: int) -> np.ndarray:
    """Items the model may see for training and prompting: all but the last two."""
    return self.sequences[user][:-2]

  def valid_target(self, user: int) -> int:
    return int(self.sequences[user][-2])

  def test_target(self, user: int) -> int:
    return int(self.sequences[user][-1])

  def item(self, item_id: int) -> Item:
    return self.items[item_id - 1]





def save(dataset: SequenceDataset, directory: str) -> None:
  """Writes items.jsonl and users.jsonl atomically into `directory`."""
  os.makedirs(directory, exist_ok=True)
  io.write_jsonl(os.path.join(directory, ITEMS_FILE), (
      {"item_id": it.item_id, "raw_id": it.raw_id, "title": it.title, "brand": it.brand,
       "categories": list(it.categories), "text": it.text} for it in dataset.items))
  io.write_jsonl(os.path.join(directory, USERS_FILE), (
      {"user_id": u, "raw_id": raw, "items": seq.tolist(), "timestamps": ts.tolist()}
      for u, (raw, seq, ts) in enumerate(
          zip(dataset.user_raw_ids, dataset.sequences, dataset.timestamps))))


def _read_jsonl(path: str, keys: Sequence[str]):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run experiments/prepare_data.py "
                            "with this --workdir first")
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
        missing = [k for k in keys if k not in row]
        if missing:
          raise KeyError(f"missing keys {missing}")
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}:{line_number}: malformed prepared-data line ({e}); "
                         "delete the folder and prepare the data again") from e
      yield row


def load(directory: str, name: str = "") -> SequenceDataset:
  """Reads a folder written by `save`."""
  items = [Item(item_id=r["item_id"], raw_id=r["raw_id"], title=r["title"], brand=r["brand"],
                categories=tuple(r["categories"]), text=r["text"])
           for r in _read_jsonl(os.path.join(directory, ITEMS_FILE),
                                ("item_id", "raw_id", "title", "brand", "categories", "text"))]
  raw_ids, sequences, timestamps = [], [], []
  for r in _read_jsonl(os.path.join(directory, USERS_FILE), ("raw_id", "items", "timestamps")):
    raw_ids.append(r["raw_id"])
    sequences.append(np.asarray(r["items"], np.int32))
    timestamps.append(np.asarray(r["timestamps"], np.int64))
  return SequenceDataset(items=items, user_raw_ids=raw_ids, sequences=sequences,
                         timestamps=timestamps, name=name or os.path.basename(directory))
