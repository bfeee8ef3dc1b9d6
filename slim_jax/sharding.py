"""Device mesh and logical-axis rules, shared by every training script.

Models name the axes of their parameters and key activations with logical names
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); the mapping from those
names to the mesh axes `data`, `fsdp`, `tensor` is data (`DEFAULT_RULES`), not code.

Logical names used across the project (one vocabulary):
  batch, length            activations: examples and positions
  embed                    model width D
  heads, kv_heads, head_dim  attention projections (N, K, H)
  mlp                      feed-forward width
  vocab                    token vocabulary V
  items                    recommender item table
  layers                   stacked layers (scan)
  lora_rank                LoRA rank r
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or None: replicated). Order matters to flax: first match wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("items", None),
    ("layers", None),
    ("lora_rank", None),
)


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1}; missing axes are 1.

  An empty spec means all devices on `data`.
  """
  sizes = {axis: 1 for axis in MESH_AXES}
  if not spec:
    sizes["data"] = -1
    return sizes
  for part in spec.split(","):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ValueError(f"--mesh: bad entry {part!r}; expected a comma-separated list of "
                       f"AXIS=SIZE with AXIS in {MESH_AXES}, e.g. data=2,fsdp=4,tensor=1")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
  return sizes


def make_mesh(spec: str | dict[str, int] = "", devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  A size of -1 takes whatever devices remain. The product must equal the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
  sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for axis, size in sizes.items():
    if size == -1:
      if len(devices) % known:
        raise ValueError(f"--mesh: {len(devices)} devices cannot be split by {known}")
      sizes[axis] = len(devices) // known
  shape = tuple(sizes[a] for a in MESH_AXES)
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"--mesh: data*fsdp*tensor = {int(np.prod(shape))} but there are "
                     f"{len(devices)} devices; choose sizes whose product is {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
  mesh_specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def params_sharding(abstract_variables, mesh: Mesh, rules=DEFAULT_RULES):
  """Shardings for a variable tree from `jax.eval_shape(model.init, ...)` (boxed leaves)."""
  return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
