"""Multi-process (multi-host) runs on JAX's own runtime: flags, start-up, per-process data.

Every training script imports this module once; it defines the process flags

  --coordinator_address  host:port of process 0 (empty: from the cluster environment)
  --num_processes        processes in the job (empty: from the environment)
  --process_id           this process's index (empty: from the environment)

and, when the script has not defined it already, `--mesh` (data=N,fsdp=M,tensor=K; see
slim_jax/sharding.py). `initialize_from_flags()` at the start of `main()` calls
`jax.distributed.initialize`: with explicit flags (GPU hosts, CPU tests), or with no
arguments on a TPU slice / SLURM / Open MPI, where JAX reads the environment. A
single-process run (no flags, no cluster) skips it.

After start-up, `jax.devices()` lists the devices of every process; each process feeds only
its own devices: it loads its share of each global batch (`local_rows`) and
`global_batch` assembles the global `jax.Array` from the per-process parts with
`jax.make_array_from_process_local_data`. Orbax checkpoints are written and restored by all
processes together (slim_jax/train/checkpoints.py), each writing its own shards.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding

FLAGS = flags.FLAGS



def define_flags(mesh_help: str = "Device mesh, e.g. data=2,fsdp=2,tensor=2; empty: all "
                 "devices on data.") -> None:
  """Adds --coordinator_address, --num_processes, --process_id and --mesh to a script.

  Called by the experiment scripts at import; the library defines no flags itself, so
  importing it never clashes with a script's own flags.
  """
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for jax.distributed (e.g. 10.0.0.1:1234). "
                      "Unset: single process, or read from the cluster environment (TPU "
                      "slice, SLURM, Open MPI).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (with "
                       "--coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
  flags.DEFINE_string("mesh", "", mesh_help)


# Environment variables that mean "this process is one of a cluster JAX can detect".
_CLUSTER_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def _in_cluster() -> bool:
  if any(os.environ.get(k) for k in _CLUSTER_ENV):
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True) -> bool:
  """Joins the job; returns True when jax.distributed was initialised (False: one process).

  With `coordinator_address`, all three values are required. Without, a cluster
  environment (see `_CLUSTER_ENV`) lets JAX find them itself when `auto` is True.
  Call it before anything touches a device. Calling it twice is harmless.
  """
  if jax.distributed.is_initialized():
    return True
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ValueError("--coordinator_address, --num_processes and --process_id go "
                       "together; set all three (or none, on a TPU slice or under SLURM)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    if num_processes == 1:
      return False
    if _cpu_only():  # CPU devices of different processes talk through gloo
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto and _in_cluster():
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def _cpu_only() -> bool:
  """True when the run is on CPU (JAX_PLATFORMS=cpu, or no accelerator plugin installed)."""
  platforms = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  import importlib.util
  return not any(importlib.util.find_spec(m) for m in
                 ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm60_plugin"))


def initialize_from_flags() -> bool:
  """`initialize` from --coordinator_address/--num_processes/--process_id or the cluster."""
  try:
    return initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:
    from absl import app
    raise app.UsageError(str(e)) from None


def is_main_process() -> bool:
  """Process 0 writes the run-level files (summaries, metrics, TensorBoard, the PEFT
  export, reports) and shows progress; checkpoints are written by all processes (orbax)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing to wait for in one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


# -- each process loads only its share ---------------------------------------------------


def batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def local_rows(global_batch_size: int, sharding: NamedSharding) -> slice:
  """The rows of a global batch this process feeds, for a leading-axis batch sharding.

  Rows are split into contiguous blocks over the devices of the batch axes; a process
  owns the blocks of its addressable devices. With the mesh built from `jax.devices()`
  (process-major order), that is one contiguous range per process.
  """
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = sorted({(idx[0].start or 0) for idx in index_map.values()})
  stops = sorted({(idx[0].stop if idx[0].stop is not None else global_batch_size)
                  for idx in index_map.values()})
  start, stop = starts[0], stops[-1]
  covered = sum(b - a for a, b in zip(starts, stops))
  if covered != stop - start:
    raise ValueError("this process's batch rows are not contiguous; build the mesh with "
                     "slim_jax.sharding.make_mesh over jax.devices() (process-major order)")
  return slice(start, stop)


def global_batch(local: dict[str, np.ndarray] | np.ndarray, sharding: NamedSharding | dict,
                 global_batch_size: int) -> Any:
  """Global jax.Arrays [global_batch_size, ...] from this process's rows (`local_rows`).

  `sharding` is one NamedSharding for every entry or a dict of them per key.
  """
  def one(x, s):
    x = np.asarray(x)
    shape = (global_batch_size,) + x.shape[1:]
    return jax.make_array_from_process_local_data(s, x, shape)
  if isinstance(local, dict):
    return {k: one(v, sharding[k] if isinstance(sharding, dict) else sharding)
            for k, v in local.items()}
  return one(local, sharding)


def shard_global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding | dict) -> dict:
  """A host batch every process holds in full -> global arrays, each process sending only
  its own rows to its devices (no cross-process traffic). jax.Arrays pass through."""
  out = {}
  for k, v in batch.items():
    if isinstance(v, jax.Array):
      out[k] = v
      continue
    s = sharding[k] if isinstance(sharding, dict) else sharding
    rows = local_rows(v.shape[0], s)
    out[k] = jax.make_array_from_process_local_data(s, np.asarray(v)[rows], v.shape)
  return out


def to_host(tree: Any) -> Any:
  """Host numpy copies of (possibly cross-process sharded) arrays, on every process."""
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)
