"""slim_jax/row_chunks.py: chunk sizes divide the batch; chunked maps equal the whole call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax import row_chunks


def test_chunk_rows_divides_the_batch():
  assert row_chunks.chunk_rows(64, 128) == 8
  assert row_chunks.chunk_rows(64, 256) == 4
  assert row_chunks.chunk_rows(64, 16) == 64  # small batches run in one pass
  assert row_chunks.chunk_rows(48, 96) == 8  # 10 rows would not divide 48
  assert row_chunks.chunk_rows(3, 2000) == 1
  assert row_chunks.chunk_rows(6, 300, chunk_tokens=1024) == 3
  assert row_chunks.chunk_rows(64, 128, chunk_tokens=None) == 64


def test_only_the_cpu_backend_chunks():
  expected = row_chunks.CHUNK_TOKENS if jax.default_backend() == "cpu" else None
  assert row_chunks.default_chunk_tokens() == expected


def test_map_row_chunks_equals_the_whole_call():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((12, 5, 4), np.float32))
  mask = jnp.asarray(rng.random((12, 5)) > 0.3)
  w = jnp.asarray(rng.standard_normal((4, 6), np.float32))

  def fn(tree):  # a per-row computation returning a tree of two leaves
    h = jnp.tanh(tree["x"] @ w) * tree["mask"][..., None]
    return h.sum(1), {"h": h}

  whole = fn({"x": x, "mask": mask})
  for per_chunk in (1, 3, 4, 12):
    chunked = jax.jit(lambda t, p=per_chunk: row_chunks.map_row_chunks(fn, p, t))(
        {"x": x, "mask": mask})
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-6)
    np.testing.assert_allclose(chunked[1]["h"], whole[1]["h"], atol=1e-6)
  with pytest.raises(ValueError, match="does not divide"):
    row_chunks.map_row_chunks(fn, 5, {"x": x, "mask": mask})
