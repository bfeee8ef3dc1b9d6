"""Loading a student or teacher for generation: a LLaMA (Hugging Face folder or .gguf) and
an optional PEFT LoRA adapter -> slim_jax.generate.Generator. The server, the student
rationale stage and experiments/generate.py all load through here, so an adapter is applied
one way everywhere."""

from __future__ import annotations

import os

import jax.numpy as jnp

from slim_jax import generate
from slim_jax.convert import pretrained
from slim_jax.models import lora as lora_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_generator(model: str, adapter: str | None, max_batch_size: int, max_seq_len: int,
                   dtype: str, pad_batches: bool = False):
  """(generator, model name) from a LLaMA folder or .gguf and an optional PEFT adapter.

  The adapter is merged into the base weights once (W + scale * a @ b): decoding then runs
  the base model's programs, with no extra adapter matmuls per step, and shares compiled
  code with the base model."""
  if not os.path.exists(model):
    raise FileNotFoundError(f"--model={model} does not exist; give a Hugging Face LLaMA "
                            "folder or a .gguf file")
  config, params, tokenizer = pretrained.load_llama(model)
  if adapter:
    lora, spec = lora_lib.load_peft(adapter)
    params = lora_lib.merge(params, lora, spec.scale)
  generator = generate.Generator(config, params, tokenizer, max_batch_size=max_batch_size,
                                 max_seq_len=max_seq_len, pad_batches=pad_batches,
                                 dtype=DTYPES[dtype])
  name = os.path.basename(os.path.normpath(model))
  if name.endswith(".gguf"):
    name = name[:-len(".gguf")]
  return generator, name
