"""Run a batch through a model a few rows at a time inside one jitted program.

  per_chunk = chunk_rows(rows, length)              # rows per pass, a divisor of rows
  out = map_row_chunks(fn, per_chunk, tree)         # fn on [per_chunk, ...] slices

On a CPU, a [64, 128] batch of a small transformer writes [8192, 4D] feed-forward
activations that miss every cache level between two matmuls; eight passes of [8, 128]
keep each pass's [1024, 4D] in cache. `map_row_chunks` splits the leading (row) axis of
every leaf of `tree` into [rows / per_chunk, per_chunk, ...] (a reshape, no copy), runs
`fn` on each slice with `lax.map` and merges the leading axes of every output leaf back.
Rows must not interact in `fn` (true of encoders and of prefill, where each row attends to
itself only), so the result equals `fn(tree)`.

Only CPUs gain: a GPU or TPU is faster on the whole batch, so `default_chunk_tokens()` is
CHUNK_TOKENS on the CPU backend and None (one pass) elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

CHUNK_TOKENS = 1024  # rows x length per pass: MiniLM's [1024, 1536] activations are 6 MiB


def default_chunk_tokens() -> int | None:
  """CHUNK_TOKENS on the CPU backend; None (the whole batch in one pass) elsewhere."""
  return CHUNK_TOKENS if jax.default_backend() == "cpu" else None


def chunk_rows(rows: int, length: int, chunk_tokens: int | None = CHUNK_TOKENS) -> int:
  """Rows per pass for a [rows, length] batch: the largest divisor of rows that is at most
  chunk_tokens / length (at least 1); all rows when chunk_tokens is None."""
  if chunk_tokens is None:
    return rows
  per_chunk = max(1, min(rows, chunk_tokens // max(length, 1)))
  while rows % per_chunk:
    per_chunk -= 1
  return per_chunk


def map_row_chunks(fn: Callable[[Any], Any], per_chunk: int, tree: Any) -> Any:
  """fn(tree) computed `per_chunk` rows at a time; every leaf's axis 0 is the row axis."""
  rows = jax.tree.leaves(tree)[0].shape[0]
  if per_chunk >= rows:
    return fn(tree)
  if rows % per_chunk:
    raise ValueError(f"per_chunk={per_chunk} does not divide the {rows} rows")
  split = jax.tree.map(lambda x: x.reshape(rows // per_chunk, per_chunk, *x.shape[1:]), tree)
  out = jax.lax.map(fn, split)
  return jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), out)
