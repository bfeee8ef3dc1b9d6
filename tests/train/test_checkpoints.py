"""The orbax wrapper: save/restore round trip, best/latest, keep N, sharded restore, errors."""

import gc

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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_clear_errors(tmp_path):
  with Checkpointer(str(tmp_path / "empty")) as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ck.restore(_tree(0.0))
    ck.save(0, _tree(1.0))
    with pytest.raises(ValueError, match="does not match"):
      ck.restore({"w": jnp.zeros((5, 4)), "b": {"c": jnp.zeros(3)}})
    # orbax abandons the reads of the other arrays when one fails; their coroutines raise
    # GeneratorExit when collected. Collect them here, so the warning lands on this test
    # (filtered above) instead of whichever test happens to run the garbage collector.
    gc.collect()
