"""GGUF (llama.cpp) LLaMA files -> Flax params, config and tokenizer.

Tensors are dequantized to float32 with the `gguf` package (every type it knows: F32, F16,
BF16, Q4_0/1, Q5_x, Q8_0, K-quants, ...). `gguf` gives numpy arrays whose shape is the
reverse of the GGUF shape, i.e. torch's [out, in]. llama.cpp's converter permutes the rows
of q and k (per head, interleaving the two rotary halves); `unpermute` undoes it so the
weights are the Hugging Face ones. Tensors are then renamed to Hugging Face keys and go
through the one conversion table of llama_hf.py. The config comes from the `llama.*`
metadata, the tokenizer from the `tokenizer.*` metadata (vocabulary, merges, special
tokens, chat template) through transformers' GGUF tokenizer builders, without torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from slim_jax.convert import llama_hf

GGUF_MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}


def is_gguf(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == GGUF_MAGIC


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation: w [n_head * H, ...] in GGUF order -> HF order."""
  d = w.shape[0]
  return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_key(name: str) -> str:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
  m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
  if m and m.group(1) in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
  return name  # unknown: the strict table check reports it as unused


def _reader(path: str):
  import gguf  # pylint: disable=import-outside-toplevel
  if not is_gguf(path):
    raise ValueError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/IndexError/... on a damaged file
    raise ValueError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {e}); it may be "
                     "truncated or corrupt: copy or download it again") from e


def _field(reader, key: str, default: Any = None):
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


def read_config(reader, path: str):
  """LlamaConfig from the GGUF metadata."""
  from slim_jax.models import llama  # pylint: disable=import-outside-toplevel
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"{path}: general.architecture is {arch!r}; this loader reads LLaMA "
                     "GGUF files only")

  def need(key):
    value = _field(reader, f"llama.{key}")
    if value is None:
      raise ValueError(f"{path}: metadata key llama.{key} is missing")
    return value

  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ValueError(f"{path}: holds rope_freqs.weight (LLaMA 3.1 rope scaling baked into a "
                     "tensor), which this loader does not read; load the Hugging Face folder")
  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  vocab = _field(reader, "llama.vocab_size")
  if vocab is None:
    vocab = len(_field(reader, "tokenizer.ggml.tokens", []))
  scaling = None
  kind = _field(reader, "llama.rope.scaling.type")
  if kind not in (None, "none"):
    if kind != "linear":
      raise ValueError(f"{path}: llama.rope.scaling.type={kind!r} is not supported")
    scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
  head_dim = _field(reader, "llama.attention.key_length") or hidden // heads
  return llama.LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
      head_dim=int(head_dim),
      rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
      max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
      tie_word_embeddings="output.weight" not in names,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))


def read_tensors(reader, path: str, config) -> dict[str, np.ndarray]:
  """All tensors dequantized to float32, HF-named, q/k un-permuted, shapes [out, in]."""
  import gguf  # pylint: disable=import-outside-toplevel
  tensors = {}
  for t in reader.tensors:
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except Exception as e:  # unknown type, or data cut short
      raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}, "
                       f"{type(e).__name__}: {e})") from e
    want = tuple(int(x) for x in reversed(list(t.shape)))
    if w.shape != want:
      raise ValueError(f"{path}: tensor {t.name} dequantized to {w.shape}, expected {want}; "
                       "the file may be truncated")
    key = hf_key(t.name)
    if key.endswith("self_attn.q_proj.weight"):
      w = unpermute(w, config.num_attention_heads)
    elif key.endswith("self_attn.k_proj.weight"):
      w = unpermute(w, config.num_key_value_heads)
    tensors[key] = w
  return tensors


def _tokenizer_cache_dir(path: str) -> str | None:
  """Where the converted tokenizer of this exact file is cached (None: caching off)."""
  root = os.environ.get("SLIM_JAX_CACHE", os.path.join(
      os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slim_jax"))
  if not root:
    return None
  stat = os.stat(path)
  key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  return os.path.join(root, "gguf_tokenizers", key.hexdigest()[:24])


def build_tokenizer(reader, path: str):
  """transformers' fast tokenizer from a GGUF file's `tokenizer.*` metadata, without torch.

  transformers' own GGUF path (`AutoTokenizer(..., gguf_file=)`) reads the file with a
  reader that imports torch; here the `gguf` package reads the metadata and transformers'
  GGUF tokenizer builders (`integrations/gguf/gguf_tokenizer_mapping.py`, which need only
  `tokenizers`) turn it into the same tokenizer: vocabulary, merges, control and
  user-defined tokens, pre-tokenizer split, BOS/EOS/UNK/pad and the chat template. Those
  builders are not a public API, so requirements.txt pins transformers to the tested
  minor release (BUILD.md).
  """
  import transformers  # pylint: disable=import-outside-toplevel
  from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping  # pylint: disable=import-outside-toplevel
  groups = {}
  for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items():
    groups[group] = {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                     if f"tokenizer.{key}" in reader.fields}
  tokenizer_dict, config = groups["tokenizer"], groups["tokenizer_config"]
  tokens = tokenizer_dict.get("tokens")
  if not tokens:
    raise ValueError(f"{path}: metadata key tokenizer.ggml.tokens is missing or empty; the file "
                     "has no vocabulary to build a tokenizer from")
  if tokenizer_dict.get("tokenizer_type") == "llama":
    config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece files
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = _field(reader, f"tokenizer.ggml.{key}")
    if token_id is not None and not 0 <= int(token_id) < len(tokens):
      raise ValueError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary "
                       f"of {len(tokens)} tokens")
    config[name] = tokens[int(token_id)] if token_id is not None else None
  architecture = _field(reader, "general.architecture")
  try:
    backend, extra = mapping.convert_gguf_tokenizer(architecture, tokenizer_dict)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def load_tokenizer(path: str, reader=None):
  """The tokenizer of a GGUF file (build_tokenizer), cached.

  Building it from the GGUF takes a few seconds, so the result is saved once under
  $SLIM_JAX_CACHE (default ~/.cache/slim_jax; empty string: no cache), keyed by the file's
  path, size and modification time, and later loads read that folder.
  """
  import transformers  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file")
  cache = _tokenizer_cache_dir(path)
  if cache and os.path.exists(os.path.join(cache, "tokenizer_config.json")):
    try:
      return transformers.AutoTokenizer.from_pretrained(cache)
    except Exception:  # pylint: disable=broad-except
      pass  # a damaged cache entry: rebuild it below
  tokenizer = build_tokenizer(reader if reader is not None else _reader(path), path)
  if cache:
    try:
      os.makedirs(os.path.dirname(cache), exist_ok=True)
      tmp = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".tmp-tokenizer-")
      tokenizer.save_pretrained(tmp)
      try:
        os.replace(tmp, cache)
      except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
      pass  # a read-only cache location: work without the cache
  return tokenizer


def load_gguf(path: str, param_dtype=None) -> tuple[Any, dict, Any]:
  """(config, params, tokenizer) from a LLaMA .gguf file (tokenizer None if it has none)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such GGUF file")
  reader = _reader(path)
  config = read_config(reader, path)
  if param_dtype is not None:
    import dataclasses  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(config, param_dtype=param_dtype)
  tensors = read_tensors(reader, path, config)
  params = llama_hf.tensors_to_params(config, tensors, source=path, param_dtype=param_dtype)
  has_tokenizer = _field(reader, "tokenizer.ggml.model") is not None
  return config, params, load_tokenizer(path, reader) if has_tokenizer else None
