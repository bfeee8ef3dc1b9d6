"""Loading and saving whole pretrained models: the entry points over the conversion tables.

  config, params, tokenizer = pretrained.load_llama(path)  # HF folder or .gguf
  config, params, tokenizer = pretrained.load_bert(path)   # HF folder

Strict: every checkpoint tensor is used and every shape checked (slim_jax/convert/table.py).
These live in convert/, not beside the models, so that models/ never imports convert/.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from slim_jax.convert import bert_hf, gguf_llama, llama_hf


def load_llama(path: str, param_dtype=None) -> tuple[Any, dict, Any]:
  """(LlamaConfig, params, tokenizer) from a Hugging Face LLaMA folder or a .gguf file.

  The tokenizer is None for a folder without tokenizer files. `param_dtype` (e.g.
  "bfloat16") keeps weights in that dtype instead of float32 (halves memory for a 7B model).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: give a Hugging Face LLaMA folder "
                            "(config.json + safetensors) or a .gguf file")
  if os.path.isdir(path):
    return llama_hf.load_folder(path, param_dtype=param_dtype)
  if path.endswith(".gguf") or gguf_llama.is_gguf(path):
    return gguf_llama.load_gguf(path, param_dtype=param_dtype)
  raise ValueError(f"{path} is neither a folder nor a .gguf file")


def save_llama(config, params: Mapping, path: str, tokenizer=None,
               max_shard_bytes: int = 5 * 2 ** 30) -> None:
  """Writes a Hugging Face folder (config.json, safetensors, tokenizer) transformers loads."""
  llama_hf.save_folder(config, params, path, tokenizer=tokenizer,
                       max_shard_bytes=max_shard_bytes)


def load_bert(path: str, dtype: str | None = None) -> tuple[Any, dict, Any]:
  """(BertConfig, params, tokenizer) from a Hugging Face BERT folder (config.json +
  safetensors). Pre-training heads `cls.*` are ignored. `dtype` (e.g. "bfloat16") sets the
  compute dtype; weights stay float32. The tokenizer is None without tokenizer files."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a folder: give a Hugging Face BERT folder "
                            "(config.json + model.safetensors + tokenizer files)")
  return bert_hf.load_folder(path, dtype=dtype)


def save_bert(config, params, path: str, tokenizer=None) -> None:
  """Writes a Hugging Face folder (config.json, model.safetensors) transformers loads."""
  bert_hf.save_folder(config, params, path, tokenizer=tokenizer)
