"""Functional LoRA: an adapter tree beside a frozen parameter tree, and its PEFT format.

The adapter is a plain pytree that mirrors the paths of the adapted kernels,
`{"layers_0": {"self_attn": {"q_proj": {"a": [I, r], "b": [r, F]}}}}`, and it is passed to
the model as the `lora` variable collection:

  model = Llama(cfg, lora_scale=spec.scale, lora_dropout=spec.dropout)
  logits = model.apply({"params": base, "lora": adapter}, ids)

`slim_jax.models.layers.Linear` then computes `x @ W + scale * (dropout(x) @ a) @ b`, so
`W + a b` is never materialised while training, gradients are taken with respect to the
adapter alone, and the frozen base is never copied. `merge` folds the adapter into the
base for inference. `save_peft` / `load_peft` read and write the Hugging Face PEFT format
(`adapter_config.json` + `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained`
loads onto the matching `transformers` model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from slim_jax import io

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which kernels to adapt and how.

  targets: regular expressions; a kernel is adapted when one of them fully matches the
    name of its module (`q_proj`) or its module path (`layers_3/self_attn/q_proj`).
  rank, alpha: the adapter update is `(alpha / rank) * a @ b`, as in PEFT.
  dropout: dropout on the adapter's input while training (PEFT's `lora_dropout`).
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ATTENTION_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if not self.targets:
      raise ValueError("LoRA targets are empty: name at least one module, e.g. q_proj")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def matches(self, module_path: Sequence[str]) -> bool:
    joined = "/".join(module_path)
    return any(re.fullmatch(t, module_path[-1]) or re.fullmatch(t, joined)
               for t in self.targets)


def target_paths(params: Params, spec: LoraSpec) -> list[tuple[str, ...]]:
  """Module paths (kernel's parent) of every 2-D kernel `spec` adapts, in tree order."""
  paths = []
  for path, leaf in traverse_util.flatten_dict(dict(params)).items():
    if path[-1] == "kernel" and len(path) > 1 and spec.matches(path[:-1]):
      if np.ndim(leaf) != 2:
        raise ValueError(f"LoRA target {'/'.join(path)} has shape {np.shape(leaf)}; only "
                         "2-D kernels [in, out] can be adapted")
      paths.append(path[:-1])
  if not paths:
    names = sorted({p[-2] for p in traverse_util.flatten_dict(dict(params)) if len(p) > 1})
    raise ValueError(f"LoRA targets {spec.targets} match no kernel; module names in the "
                     f"model are {names[:20]}")
  return paths


def init_lora(params: Params, spec: LoraSpec, rng: jax.Array,
              dtype=jnp.float32) -> dict:
  """A fresh adapter for `params`: `a` ~ U(+-1/sqrt(in)) as PEFT does, `b` = 0.

  With `b` zero the adapted model starts exactly at the base model. `params` may be
  concrete arrays or `jax.ShapeDtypeStruct`s (inside `jax.eval_shape`).
  """
  flat_params = traverse_util.flatten_dict(dict(params))
  flat = {}
  for i, path in enumerate(target_paths(params, spec)):
    fan_in, fan_out = flat_params[path + ("kernel",)].shape
    bound = 1.0 / np.sqrt(fan_in)
    key = jax.random.fold_in(rng, i)
    flat[path + ("a",)] = jax.random.uniform(key, (fan_in, spec.rank), dtype, -bound, bound)
    flat[path + ("b",)] = jnp.zeros((spec.rank, fan_out), dtype)
  return traverse_util.unflatten_dict(flat)


def lora_partition_specs(lora: Params, param_specs: Params) -> dict:
  """Logical PartitionSpecs for an adapter from those of the base kernels.

  `param_specs` is `nn.get_partition_spec(abstract_params)`; a kernel named (in, out)
  gives `a` (in, lora_rank) and `b` (lora_rank, out).
  """
  flat_specs = traverse_util.flatten_dict(dict(param_specs))
  out = {}
  for path in traverse_util.flatten_dict(dict(lora)):
    kernel_spec = flat_specs.get(path[:-1] + ("kernel",))
    if kernel_spec is None:
      raise KeyError(f"adapter leaf {'/'.join(path)} has no base kernel "
                     f"{'/'.join(path[:-1])}/kernel; adapter and model do not match")
    axis_in, axis_out = tuple(kernel_spec) if len(kernel_spec) == 2 else (None, None)
    out[path] = (PartitionSpec(axis_in, "lora_rank") if path[-1] == "a"
                 else PartitionSpec("lora_rank", axis_out))
  return traverse_util.unflatten_dict(out)


def merge(params: Params, lora: Params, scale: float) -> dict:
  """`params` with every adapted kernel replaced by `W + scale * a @ b` (for inference)."""
  flat = dict(traverse_util.flatten_dict(dict(params)))
  for path, ab in traverse_util.flatten_dict(dict(lora), is_leaf=_adapter_leaf).items():
    kernel = flat.get(path + ("kernel",))
    if kernel is None:
      raise KeyError(f"adapter for {'/'.join(path)} has no base kernel in params")
    delta = jnp.asarray(ab["a"], jnp.float32) @ jnp.asarray(ab["b"], jnp.float32)
    flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def num_parameters(tree: Params) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _is_adapter(x) -> bool:
  return isinstance(x, Mapping) and set(x) == {"a", "b"}


def _adapter_leaf(prefix, x) -> bool:  # `is_leaf` for traverse_util.flatten_dict
  del prefix
  return _is_adapter(x)


# ---------------------------------------------------------------------------------------
# Hugging Face names: Flax module paths of LlamaForCausalLM <-> torch module names.

def hf_module_name(path: Sequence[str]) -> str:
  """("layers_3", "self_attn", "q_proj") -> "model.layers.3.self_attn.q_proj"."""
  parts = []
  for p in path:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    parts.extend([m.group(1), m.group(2)] if m and m.group(1) == "layers" else [p])
  name = ".".join(parts)
  return name if path[0] == "lm_head" else "model." + name


def flax_module_path(name: str) -> tuple[str, ...]:
  """The inverse of `hf_module_name`."""
  parts = name.split(".")
  if parts[0] == "model":
    parts = parts[1:]
  out: list[str] = []
  i = 0
  while i < len(parts):
    if parts[i] == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f"layers_{parts[i + 1]}")
      i += 2
    else:
      out.append(parts[i])
      i += 1
  return tuple(out)


def _peft_target_config(paths: list[tuple[str, ...]], num_layers: int | None) -> dict:
  """target_modules (and layers_to_transform) so PEFT adapts exactly `paths`."""
  names = sorted({p[-1] for p in paths})
  layer_of = {p: int(p[0].split("_")[1]) for p in paths if re.fullmatch(r"layers_\d+", p[0])}
  if len(layer_of) == len(paths):
    layers = sorted(set(layer_of.values()))
    rest = {p[1:] for p in paths}
    if len(paths) == len(layers) * len(rest) and len(rest) == len(names):
      config: dict[str, Any] = {"target_modules": names}
      if num_layers is None or layers != list(range(num_layers)):
        config["layers_to_transform"] = layers
        config["layers_pattern"] = "layers"
      return config
  # Any other selection: a regular expression that names each module exactly.
  return {"target_modules": "^(" + "|".join(re.escape(hf_module_name(p))
                                             for p in paths) + ")$"}


def save_peft(path: str, lora: Params, spec: LoraSpec, base_model_name_or_path: str = "",
              num_layers: int | None = None) -> None:
  """Writes `lora` as a PEFT LoRA adapter folder for `LlamaForCausalLM`.

  Keys are `base_model.model.<module>.lora_A.weight` [r, in] (= a.T) and `lora_B.weight`
  [out, r] (= b.T). `num_layers` (the model's layer count) lets the config say whether
  every layer is adapted. Files are written to temporary names and renamed.
  """
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  adapters = traverse_util.flatten_dict(dict(lora), is_leaf=_adapter_leaf)
  tensors = {}
  for module_path, ab in adapters.items():
    name = _PEFT_PREFIX + hf_module_name(module_path)
    tensors[name + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
    tensors[name + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None,
      "r": spec.rank,
      "lora_alpha": spec.alpha,
      "lora_dropout": spec.dropout,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      **_peft_target_config(list(adapters), num_layers),
  }
  with io.atomic_path(os.path.join(path, PEFT_WEIGHTS_FILE)) as tmp:
    save_file(tensors, tmp, metadata={"format": "pt"})
  io.write_json(os.path.join(path, PEFT_CONFIG_FILE), config)


def load_peft(path: str) -> tuple[dict, LoraSpec]:
  """Reads a PEFT LoRA folder (ours or PEFT's) into an adapter tree and its spec."""
  from safetensors.numpy import load_file

  config_file = os.path.join(path, PEFT_CONFIG_FILE)
  weights_file = os.path.join(path, PEFT_WEIGHTS_FILE)
  for f in (config_file, weights_file):
    if not os.path.exists(f):
      raise FileNotFoundError(f"{f} is missing; a PEFT adapter folder holds "
                              f"{PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE}")
  with open(config_file, encoding="utf-8") as f:
    config = json.load(f)
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}; only LORA "
                     "adapters can be read")
  for key in ("use_dora", "use_rslora"):
    if config.get(key):
      raise ValueError(f"{config_file}: {key}=true is not supported; train a plain LoRA")
  flat = {}
  for key, value in load_file(weights_file).items():
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
    if m is None:
      raise KeyError(f"{weights_file}: unexpected tensor {key!r}; expected "
                     "'<module>.lora_A.weight' or '<module>.lora_B.weight'")
    module_path = flax_module_path(m.group(1))
    flat[module_path + ("a" if m.group(2) == "A" else "b",)] = np.asarray(value, np.float32).T
  lora = traverse_util.unflatten_dict(flat)
  for module_path, ab in traverse_util.flatten_dict(lora, is_leaf=_adapter_leaf).items():
    if not _is_adapter(ab):
      raise KeyError(f"{weights_file}: {hf_module_name(module_path)} lacks lora_A or lora_B")
  targets = config.get("target_modules") or list(ATTENTION_TARGETS)
  if isinstance(targets, str):
    # PEFT's regex is over torch module names; ours over Flax paths. Name them one by one.
    targets = ["/".join(p) for p in traverse_util.flatten_dict(lora, is_leaf=_adapter_leaf)]
  rank = int(config["r"])
  spec = LoraSpec(rank=rank, alpha=float(config.get("lora_alpha", rank)),
                  dropout=float(config.get("lora_dropout", 0.0)),
                  targets=tuple(targets))
  return lora, spec


