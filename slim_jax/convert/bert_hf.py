"""Hugging Face BERT <-> Flax: the conversion table, folder loading and folder export.

The table maps each Flax path of slim_jax.models.bert to one `BertModel` state-dict key;
torch Linear weights [out, in] are transposed to kernels [in, out], everything else is
copied. Checkpoints saved from a task model (`BertForPreTraining`, `BertForMaskedLM`, as
bert-base-uncased is) prefix the encoder with `bert.` and add heads under `cls.`: the prefix
is removed and the heads dropped (logged). Old checkpoints name LayerNorm parameters
`gamma`/`beta`: renamed. Every other tensor must be used, and every shape must match.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from slim_jax.convert import hf_folder
from slim_jax.convert.table import (Table, flax_to_hf, hf_to_flax, identity,
                                    read_safetensors_folder, transpose)

_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _linear(t: Table, flax_prefix: tuple[str, ...], hf_prefix: str) -> None:
  t[flax_prefix + ("kernel",)] = (f"{hf_prefix}.weight", transpose, transpose)
  t[flax_prefix + ("bias",)] = (f"{hf_prefix}.bias", identity, identity)


def _norm(t: Table, flax_prefix: tuple[str, ...], hf_prefix: str) -> None:
  t[flax_prefix + ("scale",)] = (f"{hf_prefix}.weight", identity, identity)
  t[flax_prefix + ("bias",)] = (f"{hf_prefix}.bias", identity, identity)


def table(config) -> Table:
  """{flax path: (hf key, to_flax, to_hf)} for a BertConfig."""
  t: Table = {}
  for name in ("word", "position", "token_type"):
    t[("embeddings", f"{name}_embeddings", "embedding")] = (
        f"embeddings.{name}_embeddings.weight", identity, identity)
  _norm(t, ("embeddings", "LayerNorm"), "embeddings.LayerNorm")
  for i in range(config.num_hidden_layers):
    layer, hf = f"layers_{i}", f"encoder.layer.{i}"
    for name in ("query", "key", "value"):
      _linear(t, (layer, "attention", name), f"{hf}.attention.self.{name}")
    _linear(t, (layer, "attention", "output"), f"{hf}.attention.output.dense")
    _norm(t, (layer, "attention_norm"), f"{hf}.attention.output.LayerNorm")
    _linear(t, (layer, "intermediate"), f"{hf}.intermediate.dense")
    _linear(t, (layer, "output"), f"{hf}.output.dense")
    _norm(t, (layer, "output_norm"), f"{hf}.output.LayerNorm")
  if config.add_pooling_layer:
    _linear(t, ("pooler",), "pooler.dense")
  return t


def normalize_keys(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """BertModel state-dict names: drops `bert.` prefixes, `cls.` heads, buffers; gamma/beta."""
  out = {}
  heads = []
  for key, value in tensors.items():
    if key.startswith("cls.") or key.startswith("classifier."):
      heads.append(key)
      continue
    name = key[len("bert."):] if key.startswith("bert.") else key
    if name in _BUFFERS:
      continue
    if name.endswith(".gamma"):
      name = name[:-len("gamma")] + "weight"
    elif name.endswith(".beta"):
      name = name[:-len("beta")] + "bias"
    if name in out:
      raise KeyError(f"{source}: tensor {key!r} duplicates {name!r}")
    out[name] = value
  if heads:
    logging.info("%s: ignoring %d task-head tensors (%s ...); only the encoder is used",
                 source, len(heads), heads[0])
  return out


def read_config(path: str, **overrides):
  """BertConfig from <path>/config.json, with errors naming the file."""
  from slim_jax.models import bert  # pylint: disable=import-outside-toplevel
  return hf_folder.read_config(path, bert.BertConfig, **overrides)


def tensors_to_params(config, tensors: Mapping[str, np.ndarray], source: str) -> dict:
  """Strictly converts HF-named tensors (already normalised) to the Flax tree of `config`."""
  from slim_jax.models import bert  # pylint: disable=import-outside-toplevel
  return hf_to_flax(table(config), tensors, bert.param_shapes(config), source=source)


def load_folder(path: str, dtype: str | None = None) -> tuple[Any, dict, Any]:
  """(config, params, tokenizer) from a Hugging Face BERT folder.

  The pooler is part of the config when the checkpoint has its weights.
  """
  tensors = normalize_keys(read_safetensors_folder(path), source=path)
  overrides: dict[str, Any] = {"add_pooling_layer": "pooler.dense.weight" in tensors}
  if dtype is not None:
    overrides["dtype"] = dtype
  config = read_config(path, **overrides)
  params = tensors_to_params(config, tensors, source=path)
  return config, params, hf_folder.load_tokenizer(path)


def save_folder(config, params: Mapping, path: str, tokenizer=None) -> None:
  """config.json + model.safetensors (BertModel names) + the tokenizer when given."""
  hf_folder.write_folder(path, flax_to_hf(table(config), params), config.to_hf_config(),
                         tokenizer)
