"""Memory plan of a LoRA distillation run: bytes per device, before allocating anything.

Parameters, adapter and optimizer state come from `jax.eval_shape` of the real
initialisers (slim_jax/models/llama.py, slim_jax/models/lora.py, slim_jax/train/optim.py),
each leaf divided by the mesh axes its logical names map to (slim_jax/sharding.py rules),
so the plan follows the code. Activations saved for the backward pass are counted per
layer and token from the model's structure (what `DecoderLayer` keeps alive), once without
remat (every layer's intermediates live at the peak) and once with remat (each layer's
input plus one layer's intermediates while it is recomputed), plus the float32 logits and
their gradient, which dominate for large vocabularies. Batch-shaped activations divide by
data*fsdp, head/MLP-shaped ones by tensor.

tests/test_memory_plan.py checks the totals against XLA's own buffer assignment of the
compiled train step on SmolLM2-135M and a 1B configuration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from slim_jax import sharding
from slim_jax.models import llama
from slim_jax.models import lora as lora_lib
from slim_jax.train import optim

GIB = 1024**3

PRESETS: dict[str, llama.LlamaConfig] = {
    "llama2-7b": llama.LlamaConfig(),  # transformers' LlamaConfig defaults = LLaMA2-7B
    "llama2-13b": llama.LlamaConfig(hidden_size=5120, intermediate_size=13824,
                                    num_hidden_layers=40, num_attention_heads=40,
                                    num_key_value_heads=40),
    "smollm2-135m": llama.LlamaConfig(vocab_size=49152, hidden_size=576,
                                      intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3,
                                      rms_norm_eps=1e-5, rope_theta=100000.0,
                                      max_position_embeddings=8192, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2),
    # A 1B LLaMA shape (TinyLlama-1.1B: 22 layers, GQA 32/4, LLaMA2 vocabulary).
    "llama-1b": llama.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                  num_hidden_layers=22, num_attention_heads=32,
                                  num_key_value_heads=4, rms_norm_eps=1e-5,
                                  max_position_embeddings=2048),
}

# Memory per device in GiB (HBM; GPUs' marketing "GB" are GiB-sized within 1-2%).
DEVICES: dict[str, float] = {
    "tpu-v4": 32.0, "tpu-v5e": 16.0, "a100-40": 40.0, "a100-80": 80.0, "h100-80": 80.0,
    "h200": 141.0,
}
# Share of device memory a run may plan to use: the rest is XLA workspace, fragmentation,
# and on GPU what the CUDA context and cuBLAS/cuDNN handles hold.
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Plan:
  params: int  # frozen base weights, bytes per device
  adapter: int  # LoRA a/b
  gradients: int  # adapter-sized
  optimizer: int  # AdamW moments (+ counters)
  activations: int  # saved for backward at the peak, incl. logits and their gradient
  activations_remat: int  # the same with per-layer rematerialisation
  remat: bool  # which of the two the total uses

  @property
  def total(self) -> int:
    act = self.activations_remat if self.remat else self.activations
    return self.params + self.adapter + self.gradients + self.optimizer + act

  def fits(self, device: str) -> bool:
    return self.total <= DEVICES[device] * GIB * USABLE_FRACTION

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "total": self.total}


def _shard_bytes(shape_dtype, mesh_spec, sizes: dict[str, int]) -> int:
  shape = list(shape_dtype.shape)
  for dim, axes in enumerate(tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    shape[dim] = math.ceil(shape[dim] / int(np.prod([sizes[a] for a in axes])))
  return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(shape_dtype.dtype).itemsize


def _tree_bytes(abstract, logical, sizes) -> int:
  mesh_specs = nn.logical_to_mesh(logical, sharding.DEFAULT_RULES)
  leaves = jax.tree.leaves(abstract)
  specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(leaves) == len(specs), (len(leaves), len(specs))
  return sum(_shard_bytes(a, s, sizes) for a, s in zip(leaves, specs))


def activation_bytes(config: llama.LlamaConfig, batch: int, length: int, sizes: dict[str, int],
                     remat: bool) -> int:
  """Bytes per device the backward pass needs from the forward pass, at the peak."""
  s = jnp.dtype(config.dtype).itemsize
  d, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
  n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  shards, tp = sizes["data"] * sizes["fsdp"], sizes["tensor"]
  rows = math.ceil(batch / shards) * length  # tokens per device
  # Per token and layer: replicated-width tensors (residual in, 2 norm outputs and their
  # float32 statistics, residual mid) and tensor-sharded ones (q, k, v after RoPE, the
  # attention output, gate, up, silu(gate)*up), plus the probabilities [N, keys] in compute
  # dtype: slim_jax/models/attention.py's backward pass keeps no float32 scores, and each
  # query chunk of llama.QUERY_CHUNK positions reads the keys up to its last position only.
  wide = 4 * d * s + 2 * d * 4
  split = ((n * h + 2 * k * h) * 2 + n * h + 3 * i) * s / tp
  chunk = llama.QUERY_CHUNK
  keys = sum(min(chunk, length - lo) * min(lo + chunk, length)
             for lo in range(0, length, chunk)) / length  # mean keys a query reads
  scores = n * keys * s / tp
  per_layer = rows * (wide + split + scores)
  mask = math.ceil(batch / shards) * length * length  # bool [B, T, T]
  logits = rows * v * (s + 4 + 4) / tp  # compute-dtype logits, float32 copy, its gradient
  if remat:
    layers = config.num_hidden_layers * rows * d * s + per_layer
  else:
    layers = config.num_hidden_layers * per_layer
  return int(layers + mask + logits)


def plan(config: llama.LlamaConfig, lora: lora_lib.LoraSpec, mesh: str | dict[str, int],
         batch: int, length: int, *, compute_dtype: str = "bfloat16",
         param_dtype: str = "bfloat16", remat: bool = True,
         optim_config: optim.OptimConfig = optim.OptimConfig()) -> Plan:
  """The plan for one device of `mesh` (sizes; -1 is not allowed here)."""
  sizes = sharding.parse_mesh_spec(mesh) if isinstance(mesh, str) else dict(mesh)
  sizes = {a: sizes.get(a, 1) for a in sharding.MESH_AXES}
  if any(v < 1 for v in sizes.values()):
    raise ValueError(f"mesh {mesh!r}: give every axis size (data=N,fsdp=M,tensor=K)")
  config = dataclasses.replace(config, dtype=compute_dtype, param_dtype=param_dtype)
  model = llama.Llama(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  logical = nn.get_partition_spec(boxed)["params"]
  abstract = nn.unbox(boxed)["params"]
  params = _tree_bytes(abstract, logical, sizes)
  abstract_lora = jax.eval_shape(lambda p: lora_lib.init_lora(p, lora, jax.random.key(0)),
                                 abstract)
  lora_logical = lora_lib.lora_partition_specs(abstract_lora, logical)
  adapter = _tree_bytes(abstract_lora, lora_logical, sizes)
  opt_state = jax.eval_shape(optim.make_optimizer(optim_config).init, abstract_lora)
  # Every moment mirrors the adapter and is sharded like it; scalars (counts) are tiny.
  moments = [x for x in jax.tree.leaves(opt_state) if x.shape]
  total_opt = sum(x.size * x.dtype.itemsize for x in moments)
  total_lora = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_lora))
  optimizer = int(adapter * total_opt / max(total_lora, 1))
  return Plan(params=params, adapter=adapter, gradients=adapter, optimizer=optimizer,
              activations=activation_bytes(config, batch, length, sizes, remat=False),
              activations_remat=activation_bytes(config, batch, length, sizes, remat=True),
              remat=remat)


def format_plan(p: Plan, devices=tuple(DEVICES)) -> str:
  g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
  lines = [f"  parameters     {g(p.params)}", f"  adapter        {g(p.adapter)}",
           f"  gradients      {g(p.gradients)}", f"  optimizer      {g(p.optimizer)}",
           f"  activations    {g(p.activations)}  (no remat)",
           f"  activations    {g(p.activations_remat)}  (remat)",
           f"  total          {g(p.total)}  ({'remat' if p.remat else 'no remat'})"]
  for dev in devices:
    cap = DEVICES[dev]
    lines.append(f"  {dev:<9} {cap:6.0f} GiB: {'fits' if p.fits(dev) else 'DOES NOT FIT'} "
                 f"({100 * p.total / (cap * GIB):.0f}% of memory)")
  return "\n".join(lines)
