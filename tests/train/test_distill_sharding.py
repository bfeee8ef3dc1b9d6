"""The same train step on 1 device and on 8 fake CPU devices gives the same losses."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import distill_fixtures as fx
from slim_jax import sharding
from slim_jax.data import rationale_examples as rx
from slim_jax.models import lora
from slim_jax.train import distill, optim

STEPS = 3


@pytest.fixture(scope="module")
def setup():
  cfg, params, examples = fx.tiny_setup(num=24)
  batches = rx.BucketedBatches(examples, 8, 0, rx.bucket_boundaries(384), seed=0)
  config = distill.DistillConfig(
      lora=lora.LoraSpec(rank=4, alpha=8.0, targets=lora.ATTENTION_TARGETS + lora.MLP_TARGETS),
      optim=optim.OptimConfig(learning_rate=5e-3, warmup_steps=1, total_steps=10),
      batch_size=8, microbatches=2, max_length=384)
  return cfg, params, batches, config


def _run(setup, mesh):
  cfg, params, batches, config = setup
  d = distill.Distiller(config, cfg, params, mesh=mesh)
  state = d.init_state()
  losses = []
  for step in range(STEPS):
    state, metrics = d.train_step(state, batches.batch(step))
    losses.append(float(metrics["train/loss"]))
  return losses, state, d


@pytest.fixture(scope="module")
def reference(setup):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  losses, _, _ = _run(setup, mesh)
  return losses


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2"])
def test_loss_trajectory_matches_one_device(setup, reference, spec):
  assert len(jax.devices()) == 8
  losses, state, d = _run(setup, sharding.make_mesh(spec))
  print(spec, losses, "one device:", reference)
  np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5)
  assert losses[-1] < losses[0]
  # The state really is laid out on the mesh from the logical axis names.
  a = state.lora["layers_0"]["self_attn"]["q_proj"]["a"]  # [D, r]: (embed, lora_rank)
  b = state.lora["layers_0"]["self_attn"]["q_proj"]["b"]  # [r, N*H]: (lora_rank, heads)
  sizes = sharding.parse_mesh_spec(spec)
  assert a.sharding.spec == PartitionSpec("fsdp", None)
  assert b.sharding.spec == PartitionSpec(None, "tensor")
  assert len(a.sharding.device_set) == 8
  base_kernel = d.base["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert base_kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
  shard_rows = base_kernel.addressable_shards[0].data.shape[0]
  assert shard_rows == base_kernel.shape[0] // sizes["fsdp"]
