"""Hugging Face LLaMA <-> Flax: the conversion table, folder loading and folder export.

The table maps each Flax path of slim_jax.models.llama to one `LlamaForCausalLM` state-dict
key; torch Linear weights [out, in] are transposed to kernels [in, out], everything else is
copied. The GGUF reader (gguf_llama.py) renames GGUF tensors to these same keys and then
goes through this table too, so there is one conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from slim_jax.convert import hf_folder
from slim_jax.convert.table import (Table, flax_to_hf, hf_to_flax, identity,
                                    read_safetensors_folder, transpose)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


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
  # Buffers older transformers versions saved; not parameters.
  skip = {k for k in tensors if k.endswith("rotary_emb.inv_freq")}
  if config.tie_word_embeddings and "lm_head.weight" in tensors:
    skip.add("lm_head.weight")
    if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
      raise ValueError(f"{source}: config says tie_word_embeddings=true but lm_head.weight "
                       "differs from model.embed_tokens.weight; set tie_word_embeddings "
                       "to false in config.json")
  tensors = _Without(tensors, skip)  # a view: a lazy folder stays lazy
  return hf_to_flax(table(config), tensors, llama.param_shapes(config), source=source,
                    dtype=_numpy_dtype(param_dtype))


class _Without(Mapping):
  """`tensors` less the keys in `skip`, read through (nothing is copied)."""

  def __init__(self, tensors: Mapping, skip: set[str]):
    self._tensors, self._skip = tensors, skip

  def __getitem__(self, key):
    if key in self._skip:
      raise KeyError(key)
    return self._tensors[key]

  def __iter__(self):
    return (k for k in self._tensors if k not in self._skip)

  def __len__(self) -> int:
    return sum(1 for _ in self)


def read_config(path: str):
  """LlamaConfig from <path>/config.json, with errors naming the file."""
  from slim_jax.models import llama  # pylint: disable=import-outside-toplevel
  return hf_folder.read_config(path, llama.LlamaConfig)


def load_folder(path: str, param_dtype=None) -> tuple[Any, dict, Any]:
  """(config, params, tokenizer) from a Hugging Face LLaMA folder."""
  config = read_config(path)
  if param_dtype is not None:
    import dataclasses  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(config, param_dtype=param_dtype)
  tensors = read_safetensors_folder(path)
  params = tensors_to_params(config, tensors, source=path, param_dtype=param_dtype)
  return config, params, hf_folder.load_tokenizer(path)


def save_folder(config, params: Mapping, path: str, tokenizer=None,
                max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """config.json + model.safetensors (sharded with an index past max_shard_bytes)."""
  hf_folder.write_folder(path, flax_to_hf(table(config), params), config.to_hf_config(),
                         tokenizer, max_shard_bytes=max_shard_bytes)
