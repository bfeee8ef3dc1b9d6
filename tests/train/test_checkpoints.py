"""The orbax wrapper: save/restore round trip, best/latest, keep N, sharded restore, errors."""

import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from slim_jax import sharding
from slim_jax.train.checkpoints import Checkpointer


def _tree(value: float):
  return {"w": jnp.full((8, 4), value, jnp.float32), "b": {"c": jnp.arange(3) + value}}


def test_round_trip_latest_and_metadata(tmp_path):
  with Checkpointer(str(tmp_path / "ck"), max_to_keep=2) as ck:
    for step in range(3):
      ck.save(step, _tree(step), metadata={"epoch": step, "name": "x"})
    assert ck.all_steps() == [1, 2]  # keeps the last two
    restored, meta = ck.restore(_tree(0.0))
  np.testing.assert_array_equal(restored["w"], np.full((8, 4), 2.0))
  np.testing.assert_array_equal(restored["b"]["c"], np.arange(3) + 2)
  assert meta == {"epoch": 2, "name": "x"}


def test_best_by_metric_keeps_best(tmp_path):
  with Checkpointer(str(tmp_path / "ck"), max_to_keep=2, best_metric="ndcg") as ck:
    for step, ndcg in enumerate([0.1, 0.5, 0.2, 0.3]):
      ck.save(step, _tree(step), metrics={"ndcg": ndcg})
    assert ck.best_step() == 1
    assert sorted(ck.all_steps()) == [1, 3]  # the two best survive
    restored, _ = ck.restore(_tree(0.0), step="best")
    with pytest.raises(ValueError, match="pass metrics"):
      ck.save(9, _tree(9))
  np.testing.assert_array_equal(restored["w"], np.full((8, 4), 1.0))


def test_restore_onto_sharded_abstract_target(tmp_path):
  mesh = sharding.make_mesh("data=8")
  shard = NamedSharding(mesh, PartitionSpec("data"))
  with Checkpointer(str(tmp_path / "ck")) as ck:
    ck.save(0, _tree(1.0))
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=shard),
              "b": {"c": jax.ShapeDtypeStruct((3,), jnp.float32,
                                              sharding=sharding.replicated(mesh))}}
    restored, _ = ck.restore(target)
  assert restored["w"].sharding == shard
  assert len(restored["w"].addressable_shards) == 8


def test_clear_errors(tmp_path):
  with Checkpointer(str(tmp_path / "empty")) as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ck.restore(_tree(0.0))
    ck.save(0, _tree(1.0))


@pytest.mark.parametrize("target, names", [
    ({"w": jnp.zeros((5, 4)), "b": {"c": jnp.zeros(3)}},
     r"w has shape \(8, 4\) in the checkpoint and \(5, 4\) in the model"),
    ({"w": jnp.zeros((8, 4))}, "the model lacks b/c"),
    ({**_tree(0.0), "extra": jnp.zeros(2)}, "the checkpoint lacks extra"),
])
def test_a_mismatched_target_is_refused_before_any_read(tmp_path, monkeypatch, target, names):
  with Checkpointer(str(tmp_path / "ck")) as ck:
    ck.save(0, _tree(1.0))
  # orbax abandons the other arrays' reads when one fails, and those reads then fail in its
  # background thread (unraisable exceptions that used to land on later tests).
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  with Checkpointer(str(tmp_path / "ck")) as ck:  # a fresh manager, as on resume
    with pytest.raises(ValueError, match=f"does not match.*{names}"):
      ck.restore(target)
    restored, _ = ck.restore(_tree(0.0))  # the right target still restores
  gc.collect()
  assert not unraisable
  np.testing.assert_array_equal(restored["w"], np.full((8, 4), 1.0))


def test_a_dtype_change_is_a_cast_not_a_mismatch(tmp_path):
  with Checkpointer(str(tmp_path / "ck")) as ck:
    ck.save(0, _tree(1.0))
    restored, _ = ck.restore({"w": jnp.zeros((8, 4), jnp.bfloat16), "b": {"c": jnp.zeros(3)}})
  assert restored["w"].dtype == jnp.bfloat16
