"""Hugging Face LLaMA <-> Flax: the conversion table, folder loading and folder export.

The table maps each Flax path of slim_jax.models.llama to one `LlamaForCausalLM` state-dict
key; torch Linear weights [out, in] are transposed to kernels [in, out], everything else is
copied. The GGUF reader (gguf_llama.py) renames GGUF tensors to these same keys and then
goes through this table too, so there is one conversion.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from slim_jax.convert.table import (Table, flax_to_hf, hf_to_flax, identity,
                                    read_safetensors_folder, transpose)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def table(config) -> Table:
  """{flax path: (hf key, to_flax, to_hf)} for a LlamaConfig."""
  t: Table = {("embed_tokens", "embedding"): ("model.embed_tokens.weight", identity, identity),
              ("norm", "scale"): ("model.norm.weight", identity, identity)}
  for i in range(config.num_hidden_layers):
    layer, hf = f"layers_{i}", f"model.layers.{i}"
    for name in _ATTN:
      t[(layer, "self_attn", name, "kernel")] = (f"{hf}.self_attn.{name}.weight", transpose,
                                                 transpose)
    for name in _MLP:
      t[(layer, "mlp", name, "kernel")] = (f"{hf}.mlp.{name}.weight", transpose, transpose)
    for name in ("input_layernorm", "post_attention_layernorm"):
      t[(layer, name, "scale")] = (f"{hf}.{name}.weight", identity, identity)
  if not config.tie_word_embeddings:
    t[("lm_head", "kernel")] = ("lm_head.weight", transpose, transpose)
  return t


def _numpy_dtype(name):
  if name is None:
    return np.float32
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  name = jnp.dtype(name).name
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def tensors_to_params(config, tensors: dict[str, np.ndarray], source: str,
                      param_dtype=None) -> dict:
  """Strictly converts HF-named tensors to the Flax tree of `config`."""
  from slim_jax.models import llama  # pylint: disable=import-outside-toplevel
  tensors = dict(tensors)
  # Buffers older transformers versions saved; not parameters.
  for key in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
    del tensors[key]
  if config.tie_word_embeddings and "lm_head.weight" in tensors:
    head = tensors.pop("lm_head.weight")
    if not np.array_equal(head, tensors.get("model.embed_tokens.weight")):
      raise ValueError(f"{source}: config says tie_word_embeddings=true but lm_head.weight "
                       "differs from model.embed_tokens.weight; set tie_word_embeddings "
                       "to false in config.json")
  return hf_to_flax(table(config), tensors, llama.param_shapes(config), source=source,
                    dtype=_numpy_dtype(param_dtype))


def read_config(path: str):
  """LlamaConfig from <path>/config.json, with errors naming the file."""
  from slim_jax.models import llama  # pylint: disable=import-outside-toplevel
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
    return llama.LlamaConfig.from_hf_config(data)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{file}: {e}") from e


def load_tokenizer(path: str):
  """AutoTokenizer of the folder, or None when it holds no tokenizer files."""
  if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    return None
  import transformers  # pylint: disable=import-outside-toplevel
  return transformers.AutoTokenizer.from_pretrained(path)


def load_folder(path: str, param_dtype=None) -> tuple[Any, dict, Any]:
  """(config, params, tokenizer) from a Hugging Face LLaMA folder."""
  config = read_config(path)
  if param_dtype is not None:
    import dataclasses  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(config, param_dtype=param_dtype)
  tensors = read_safetensors_folder(path)
  params = tensors_to_params(config, tensors, source=path, param_dtype=param_dtype)
  return config, params, load_tokenizer(path)


def save_folder(config, params: Mapping, path: str, tokenizer=None,
                max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """config.json + model.safetensors (sharded with an index past max_shard_bytes)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  tensors = flax_to_hf(table(config), params)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(tensors):
    nbytes = tensors[key].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = tensors[key]
    size += nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
      weight_map.update({key: name for key in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  config.to_hf_config().save_pretrained(path)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
