"""A Hugging Face model folder, whatever the model: config.json read into a config class,
the tokenizer, and safetensors written (sharded with an index past a size). The LLaMA and
BERT converters (llama_hf.py, bert_hf.py) differ only in their tables and configs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from slim_jax import io

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "tokenizer_config.json")


def read_config(path: str, config_cls, **overrides):
  """`config_cls.from_hf_config` of <path>/config.json, with errors naming the file."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} is missing: a Hugging Face model folder needs "
                            "config.json next to its safetensors")
  try:
    with open(file, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from e
  try:
    return config_cls.from_hf_config(data, **overrides)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{file}: {e}") from e


def load_tokenizer(path: str, files: Sequence[str] = TOKENIZER_FILES):
  """AutoTokenizer of the folder, or None when it holds none of the tokenizer `files`."""
  if not any(os.path.exists(os.path.join(path, f)) for f in files):
    return None
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoTokenizer.from_pretrained(path)


def write_folder(path: str, tensors: Mapping[str, np.ndarray], hf_config, tokenizer=None,
                 max_shard_bytes: int | None = None) -> None:
  """model.safetensors, or shards and model.safetensors.index.json past `max_shard_bytes`
  (None: one file); config.json; the tokenizer when given. Each file is written atomically."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(tensors):
    nbytes = tensors[key].nbytes
    if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = tensors[key]
    size += nbytes
  if len(shards) == 1:
    with io.atomic_path(os.path.join(path, "model.safetensors")) as tmp:
      save_file(shards[0], tmp, metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      with io.atomic_path(os.path.join(path, name)) as tmp:
        save_file(shard, tmp, metadata={"format": "pt"})
      weight_map.update({key: name for key in shard})
    total = sum(t.nbytes for t in tensors.values())
    io.write_json(os.path.join(path, "model.safetensors.index.json"),
                  {"metadata": {"total_size": total}, "weight_map": weight_map})
  hf_config.save_pretrained(path)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
