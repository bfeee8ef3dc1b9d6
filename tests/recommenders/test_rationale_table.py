"""The causal rule: which rationale each position reads."""

import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax.recommenders import rationale_table
from slim_jax.recommenders.rationale_table import NEVER, RationaleTable


def _table():
  # user 0: train rationale from 3 items, eval from 6; user 1: only an eval one from 4.
  train = np.asarray([[1.0, 0.0], [9.0, 9.0]], np.float32)
  final = np.asarray([[0.0, 1.0], [2.0, 2.0]], np.float32)
  return RationaleTable.from_kinds([(final, np.asarray([True, True]), np.asarray([6, 4])),
                                    (train, np.asarray([True, False]), np.asarray([3, 0]))])


def test_kinds_are_sorted_by_cutoff_and_missing_ones_never_visible():
  table = _table()
  np.testing.assert_array_equal(table.cutoffs, [[3, 6], [4, NEVER]])
  np.testing.assert_array_equal(table.present, [[True, True], [True, False]])


def test_each_position_reads_the_latest_rationale_it_may_see():
  table = _table()
  null = jnp.asarray([-5.0, -5.0])
  lengths = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7]] * 2, jnp.int32)
  out = np.asarray(rationale_table.read(table, jnp.asarray([0, 1]), lengths, null))
  expected0 = [[-5, -5]] * 3 + [[1, 0]] * 3 + [[0, 1]] * 2  # cutoffs 3 and 6
  expected1 = [[-5, -5]] * 4 + [[2, 2]] * 4  # only its eval rationale, from 4 items
  np.testing.assert_array_equal(out[0], expected0)
  np.testing.assert_array_equal(out[1], expected1)


def test_a_projected_read_equals_projecting_what_was_read():
  table = _table()
  null = jnp.asarray([-5.0, 0.5])
  w, b = jnp.asarray([[0.3, -1.0, 2.0], [1.5, 0.25, -0.5]]), jnp.asarray([0.1, 0.2, -0.3])
  project = lambda x: x @ w + b  # noqa: E731  an affine map, like g_l
  users, lengths = jnp.asarray([0, 1]), jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7]] * 2, jnp.int32)
  projected = rationale_table.read(table, users, lengths, null, project)  # [2, 8, 3]
  np.testing.assert_allclose(np.asarray(projected),
                             np.asarray(project(rationale_table.read(table, users, lengths,
                                                                     null))), rtol=1e-6)


def test_padding_sees_nothing():
  table = RationaleTable.from_kinds([(np.ones((1, 2)), np.asarray([True]), np.asarray([1]))])
  seen = rationale_table.visible(table, jnp.asarray([0]), jnp.asarray([[0, 0, 1]]))
  np.testing.assert_array_equal(np.asarray(seen)[0, :, 0], [False, False, True])


def test_prefix_lengths_within_a_row():
  inputs = jnp.asarray([[0, 0, 5, 6, 7]])
  np.testing.assert_array_equal(rationale_table.prefix_lengths(inputs), [[0, 0, 1, 2, 3]])


def test_a_present_rationale_needs_a_positive_cutoff():
  with pytest.raises(ValueError, match="cutoff 0"):
    RationaleTable.from_kinds([(np.ones((1, 2)), np.asarray([True]), np.asarray([0]))])
