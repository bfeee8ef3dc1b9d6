"""Strict conversion between Hugging Face tensors and Flax parameter trees.

A model's conversion is a table `{flax_path: (hf_key, to_flax, to_hf)}` with flax_path a
tuple of tree keys (`("layers_0", "self_attn", "q_proj", "kernel")`). Loading checks that
every table key exists in the checkpoint, every checkpoint tensor is used, and every
shape matches the shape the Flax model expects; any mismatch raises an error naming the
key. Exporting applies the inverse transforms.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import numpy as np
from flax import traverse_util

Transform = Callable[[np.ndarray], np.ndarray]
Table = dict[tuple[str, ...], tuple[str, Transform, Transform]]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] <-> Flax kernel [in, out]."""
  return np.ascontiguousarray(x.T)


def read_safetensors_folder(path: str) -> dict[str, np.ndarray]:
  """All tensors of a Hugging Face folder: model.safetensors or a sharded index."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(single):
    files = ["model.safetensors"]
  else:
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    hint = (" (pytorch_model.bin is not read: convert it to safetensors with "
            "transformers' save_pretrained(safe_serialization=True))"
            if "pytorch_model.bin" in found else "")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            f"(found {found}){hint}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    file = os.path.join(path, name)
    try:
      tensors.update(load_file(file))
    except (SafetensorError, OSError, ValueError) as e:
      raise ValueError(f"{file}: cannot read safetensors ({e}); the file may be truncated "
                       "or corrupt: copy it again") from e
  return tensors


def hf_to_flax(table: Table, tensors: Mapping[str, np.ndarray],
               expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
               source: str = "checkpoint", dtype=np.float32) -> dict:
  """Builds a nested Flax param dict from `tensors` through `table`, strictly."""
  missing_in_table = sorted(set(expected_shapes) - set(table))
  if missing_in_table:
    raise KeyError(f"conversion table lacks Flax parameters {missing_in_table[:5]}")
  flat = {}
  used = set()
  for flax_path, (hf_key, to_flax, _) in table.items():
    if flax_path not in expected_shapes:
      raise KeyError(f"conversion table names {'/'.join(flax_path)}, which the Flax model "
                     "does not have")
    if hf_key not in tensors:
      raise KeyError(f"{source}: tensor {hf_key!r} is missing (needed for "
                     f"{'/'.join(flax_path)}); is this the right model type and config?")
    value = np.asarray(to_flax(np.asarray(tensors[hf_key])), dtype=dtype)
    want = tuple(expected_shapes[flax_path])
    if value.shape != want:
      raise ValueError(f"{source}: tensor {hf_key!r} has shape {value.shape} after conversion "
                       f"but {'/'.join(flax_path)} needs {want}; the config does not match "
                       "the weights")
    flat[flax_path] = value
    used.add(hf_key)
  unused = sorted(set(tensors) - used)
  if unused:
    raise KeyError(f"{source}: tensors not used by the model: {unused[:5]}"
                   f"{' ...' if len(unused) > 5 else ''} ({len(unused)} in all); the config "
                   "does not describe this checkpoint")
  return traverse_util.unflatten_dict(flat)


def flax_to_hf(table: Table, params: Mapping) -> dict[str, np.ndarray]:
  """The inverse of `hf_to_flax`: every Flax leaf must have a table entry."""
  flat = traverse_util.flatten_dict(dict(params))
  extra = sorted(set(flat) - set(table))
  if extra:
    raise KeyError(f"Flax parameters without a conversion entry: {extra[:5]}")
  missing = sorted(set(table) - set(flat))
  if missing:
    raise KeyError(f"Flax parameters missing from the tree: {missing[:5]}")
  return {hf_key: np.ascontiguousarray(to_hf(np.asarray(flat[path], np.float32)))
          for path, (hf_key, _, to_hf) in table.items()}
