"""Mesh construction from flags and logical-axis rules."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from slim_jax import sharding
from slim_jax.models.layers import Linear


def test_parse_mesh_spec_fills_missing_axes():
  assert sharding.parse_mesh_spec("data=2,tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
  assert sharding.parse_mesh_spec("")["data"] == -1


@pytest.mark.parametrize("spec", ["dp=2", "data=x", "data"])
def test_parse_mesh_spec_rejects_bad_entries(spec):
  with pytest.raises(ValueError, match="--mesh"):
    sharding.parse_mesh_spec(spec)


def test_make_mesh_uses_all_devices_and_checks_product():
  n = len(jax.devices())
  assert n == 8, "tests/conftest.py asks for 8 fake CPU devices"
  mesh = sharding.make_mesh("")
  assert mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
  mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
  assert mesh.devices.shape == (2, 2, 2)
  with pytest.raises(ValueError, match="product is 8"):
    sharding.make_mesh("data=3")


def test_params_sharding_follows_logical_rules():
  model = Linear(features=16, axes=("embed", "mlp"))
  abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((2, 8), np.float32))
  mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
  shardings = sharding.params_sharding(abstract, mesh)
  assert shardings["params"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
  params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0),
                                                       np.zeros((2, 8), np.float32))
  kernel = nn.unbox(params)["params"]["kernel"]
  assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
