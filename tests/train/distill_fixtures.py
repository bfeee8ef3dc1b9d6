"""Shared set-up for the distillation tests: fixture examples on a tiny LLaMA.

The fixture's (prompt, rationale) pairs are tokenized with the real SmolLM2 chat template;
for the fast tests the token ids are then renumbered densely (0 stays padding) so that a
tiny model's vocabulary is the few hundred tokens the fixture uses, not 49,152.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import linen as nn

from slim_jax import assets
from slim_jax.data import rationale_examples as rx
from slim_jax.models import llama

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "rationales_fixture.jsonl")


def gguf_path() -> str:
  return assets.smollm2_gguf()


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
  """The SmolLM2 tokenizer, cached as a tokenizer.json folder in the temp dir.

  Reading it from the GGUF takes 10-20 s on a busy 2-core machine; the saved folder loads
  in under a second, so only the first test process of a machine pays.
  """
  from transformers import AutoTokenizer
  path = gguf_path()
  stat = os.stat(path)
  cache = os.path.join(tempfile.gettempdir(),
                       f"slim_jax_smollm2_tokenizer_{stat.st_size}_{int(stat.st_mtime)}")
  if not os.path.exists(os.path.join(cache, "tokenizer.json")):
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
    tok.save_pretrained(tmp)
    try:
      os.rename(tmp, cache)
    except OSError:  # another process got there first
      shutil.rmtree(tmp, ignore_errors=True)
  return AutoTokenizer.from_pretrained(cache)


@functools.lru_cache(maxsize=4)
def fixture_examples(num: int, max_length: int) -> tuple[rx.Example, ...]:
  records = rx.read_teacher_jsonl(FIXTURE)[:num]
  examples, _ = rx.build_examples(records, smollm2_tokenizer(), max_length)
  return tuple(examples)


def compact(examples) -> tuple[list[rx.Example], int]:
  """Renumbers token ids densely from 1 (0 = padding); returns (examples, vocab size)."""
  used = np.unique(np.concatenate([e.input_ids for e in examples]))
  lookup = {int(t): i + 1 for i, t in enumerate(used)}
  out = [dataclasses.replace(e, input_ids=np.asarray([lookup[int(t)] for t in e.input_ids],
                                                     np.int32)) for e in examples]
  vocab = -(-(len(used) + 1) // 8) * 8  # a multiple of 8, so any mesh can split it
  return out, vocab


def tiny_setup(num: int = 48, max_length: int = 384, seed: int = 0):
  """(model config, random base params, compacted examples) for fast tests."""
  examples, vocab = compact(fixture_examples(num, max_length))
  config = dataclasses.replace(llama.LlamaConfig.tiny(), vocab_size=vocab)
  params = llama.Llama(config).init(jax.random.key(seed), np.zeros((1, 8), np.int32))
  return config, nn.unbox(params)["params"], examples
