"""The one checkpoint wrapper of the project, over orbax's CheckpointManager.

  ckpt = Checkpointer(directory, max_to_keep=3, best_metric="valid/ndcg@10")
  ckpt.save(step, pytree, metadata={"epoch": 3}, metrics={"valid/ndcg@10": 0.31})
  pytree, metadata = ckpt.restore(target, step="best")   # or "latest", or an int

Each step holds two items: `state` (any pytree of arrays, saved with StandardSave) and
`metadata` (a JSON dict: config, epoch, whatever the caller wants to find again).
`restore` reads onto `target`, an abstract tree of `jax.ShapeDtypeStruct`s that carry
their shardings (concrete arrays are accepted and stand for their own shape, dtype and
sharding), so every array lands directly on its devices with no host-side copy of the
whole tree. With `best_metric` set, orbax keeps the `max_to_keep` best steps by that
metric instead of the most recent ones. The recommender loop and the distillation stage
both use this class.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree: Any) -> Any:
  """Arrays -> ShapeDtypeStructs with the same sharding; ShapeDtypeStructs pass through."""
  def convert(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(convert, tree)


def _mismatch_error(where: str, what: str) -> str:
  return (f"checkpoint {where} does not match the model it is restored into ({what}); was "
          "it written with other sizes or another model? Use a fresh --workdir or the same "
          "flags")


def _mismatch(saved_metadata: Any, target: Any) -> str | None:
  """What differs between a saved tree (its orbax metadata) and `target`, checked before
  any array is read: orbax abandons the other arrays' reads when one fails, and those
  reads then fail in its background thread. None when the names and shapes agree (a dtype
  may differ: restore casts)."""
  tree = getattr(saved_metadata, "tree", None)
  if tree is None:  # written without readable metadata: let the restore itself decide
    return None
  saved = {k: v for k, v in ocp.tree.to_flat_dict(tree).items() if hasattr(v, "shape")}
  wanted = {k: v for k, v in ocp.tree.to_flat_dict(ocp.tree.serialize_tree(
      abstract_like(target), keep_empty_nodes=True)).items() if hasattr(v, "shape")}
  name = "/".join
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing or extra:
    parts = [f"{label} {', '.join(name(k) for k in keys[:3])}"
             + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
             for label, keys in (("the checkpoint lacks", missing),
                                 ("the model lacks", extra)) if keys]
    return "; ".join(parts)
  for key in sorted(wanted):
    if tuple(saved[key].shape) != tuple(wanted[key].shape):
      return (f"{name(key)} has shape {tuple(saved[key].shape)} in the checkpoint and "
              f"{tuple(wanted[key].shape)} in the model")
  return None


class Checkpointer:
  """Saves and restores (pytree, metadata) per step in `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "max",
               asynchronous: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=(lambda metrics: float(metrics[best_metric])) if best_metric else None,
        best_mode=best_mode,
        create=True,
        enable_async_checkpointing=asynchronous)
    # Handlers named per item, so a manager opened on an existing folder reads the saved
    # tree's metadata (restore checks it against the target before reading any array).
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("metadata", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add("metadata", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)

  def save(self, step: int, pytree: Any, metadata: dict | None = None,
           metrics: dict | None = None) -> None:
    """Saves `pytree` and `metadata` at `step` (in the background when asynchronous)."""
    if self.best_metric and (metrics is None or self.best_metric not in metrics):
      raise ValueError(f"checkpoints in {self.directory} are ranked by {self.best_metric!r}; "
                       f"pass metrics={{{self.best_metric!r}: value}} to save()")
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(pytree),
        metadata=ocp.args.JsonSave(dict(metadata or {}))),
        metrics={k: float(v) for k, v in (metrics or {}).items()} or None)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    self.wait()
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    self.wait()
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    self.wait()
    return self._manager.best_step() if self.best_metric else self._manager.latest_step()

  def restore(self, target: Any, step: int | str = "latest") -> tuple[Any, dict]:
    """Reads step `step` ('latest', 'best' or a number) onto the (abstract) `target`."""
    self.wait()
    if step == "latest":
      resolved = self._manager.latest_step()
    elif step == "best":
      resolved = self.best_step()
    else:
      resolved = int(step)
    available = list(self._manager.all_steps())
    if resolved is None or resolved not in available:
      raise FileNotFoundError(
          f"no checkpoint {step!r} in {self.directory} (steps there: {available or 'none'}); "
          "train first or point the flag at the right --workdir")
    if target is not None:
      mismatch = _mismatch(self._manager.metadata(resolved).item_metadata["state"], target)
      if mismatch:
        raise ValueError(_mismatch_error(f"{self.directory}/{resolved}", mismatch))
    try:
      restored = self._manager.restore(resolved, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_like(target)),
          metadata=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(_mismatch_error(f"{self.directory}/{resolved}", str(e))) from e
    return restored.state, dict(restored.metadata or {})

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
