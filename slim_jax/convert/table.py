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
import struct
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


def read_safetensors_folder(path: str) -> "SafetensorsFolder":
  """The tensors of a Hugging Face folder (model.safetensors or a sharded index), read from
  disk one at a time as they are asked for."""
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
  return SafetensorsFolder([os.path.join(path, name) for name in files])


def _safetensors_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  return {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFolder(Mapping):
  """{key: tensor} over safetensors files; a tensor is read (plain reads, no memory map)
  when it is looked up, so a conversion holds the converted tree and one source tensor,
  not a second copy of the model."""

  def __init__(self, files: list[str]):
    dtypes = _safetensors_dtypes()
    self._where: dict[str, tuple] = {}  # key -> (file, dtype, shape, first byte, end byte)
    for file in files:
      try:
        with open(file, "rb") as f:
          size = os.fstat(f.fileno()).st_size
          (length,) = struct.unpack("<Q", f.read(8))
          if length > size:
            raise ValueError(f"header length {length} exceeds the file size {size}")
          header = json.loads(f.read(length))
        base = 8 + length
        for key, info in header.items():
          if key == "__metadata__":
            continue
          begin, stop = info["data_offsets"]
          if info["dtype"] not in dtypes or base + stop > size:
            raise ValueError(f"tensor {key!r}: dtype {info['dtype']} or offsets {begin}-"
                             f"{stop} cannot be read")
          self._where[key] = (file, dtypes[info["dtype"]], tuple(info["shape"]),
                              base + begin, base + stop)
      except (OSError, ValueError, KeyError, struct.error) as e:
        raise ValueError(f"{file}: cannot read safetensors ({e}); the file may be truncated "
                         "or corrupt: copy it again") from e

  def __getitem__(self, key: str) -> np.ndarray:
    file, dtype, shape, begin, stop = self._where[key]
    out = np.empty(shape, dtype)
    flat = out.reshape(-1).view(np.uint8)
    if flat.nbytes != stop - begin:
      raise ValueError(f"{file}: tensor {key!r} has {stop - begin} bytes for shape {shape}")
    with open(file, "rb") as f:
      f.seek(begin)
      if f.readinto(flat) != flat.nbytes:
        raise ValueError(f"{file}: tensor {key!r} is cut short; copy the file again")
    return out

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


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
