"""LLaMA checkpoint conversion: HF folder export/reload (single and sharded), a GGUF written
from a tiny HF model (F32 and Q8_0, llama.cpp's q/k permutation), and bad inputs failing
with messages that name what is wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from slim_jax.convert import pretrained
from slim_jax.convert import gguf_llama, llama_hf
from slim_jax.models import llama


def tiny_params(config, seed=0):
  params = llama.Llama(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
  return jax.tree.map(np.asarray, nn.unbox(params)["params"])


def batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  mask[1, :4] = 0
  return ids, mask


def torch_logits(model, ids, mask):
  import torch
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(positions).long()).logits.float().numpy()


@pytest.mark.parametrize("tied,shard", [(False, False), (True, True)])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tied, shard):
  import transformers
  config = llama.LlamaConfig.tiny(tie_word_embeddings=tied, rope_scaling={
      "rope_type": "linear", "factor": 2.0})
  params = tiny_params(config)
  pretrained.save_llama(config, params, str(tmp_path), max_shard_bytes=40_000 if shard else
                        2 ** 40)
  files = os.listdir(tmp_path)
  assert ("model.safetensors.index.json" in files) == shard
  assert (sum(f.endswith(".safetensors") for f in files) > 1) == shard
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = batch(config.vocab_size)
  ours = np.asarray(llama.Llama(config).apply({"params": params}, ids, attention_mask=mask))
  valid = mask.astype(bool)
  assert np.abs(ours - torch_logits(hf, ids, mask))[valid].max() <= 1e-4
  back_config, back, tokenizer = pretrained.load_llama(str(tmp_path))
  assert back_config == config and tokenizer is None
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_bfloat16_loading_keeps_bfloat16(tmp_path):
  config = llama.LlamaConfig.tiny()
  pretrained.save_llama(config, tiny_params(config), str(tmp_path))
  back_config, back, _ = pretrained.load_llama(str(tmp_path), param_dtype="bfloat16")
  assert back_config.param_dtype == "bfloat16"
  assert {x.dtype.name for x in jax.tree.leaves(back)} == {"bfloat16"}


# ----------------------------------------------------------------------------- GGUF

def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (what unpermute undoes)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(gguf_llama.unpermute(permute(w, 3), 3), w)
  assert not np.array_equal(permute(w, 3), w)


def write_gguf(path, hf_model, quantize_embedding=True):
  """A GGUF of `hf_model` as llama.cpp writes it: renamed, q/k permuted, types mixed."""
  import gguf
  cfg = hf_model.config
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  names = {v: k for k, v in gguf_llama._LAYER_NAMES.items()}
  for key, value in hf_model.state_dict().items():
    w = value.numpy().astype(np.float32)
    m = key.split(".")
    if key == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif key == "model.norm.weight":
      name = "output_norm.weight"
    elif key == "lm_head.weight":
      name = "output.weight"
    else:
      name = f"blk.{m[2]}.{names['.'.join(m[3:-1])]}.weight"
    if name.endswith("attn_q.weight"):
      w = permute(w, cfg.num_attention_heads)
    if name.endswith("attn_k.weight"):
      w = permute(w, cfg.num_key_value_heads)
    if w.ndim == 2 and (quantize_embedding or name != "token_embd.weight"):
      qtype = gguf.GGMLQuantizationType.Q8_0
      writer.add_tensor(name, gguf.quants.quantize(w, qtype),
                        raw_dtype=qtype)
    else:
      writer.add_tensor(name, w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  import torch
  import transformers
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
      rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, rms_norm_eps=1e-5,
      max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  write_gguf(path, model)
  return path, model


def test_gguf_loads_to_the_dequantized_transformers_weights(tiny_gguf):
  import gguf
  path, model = tiny_gguf
  config, params, tokenizer = pretrained.load_llama(str(path))
  assert tokenizer is None
  assert (config.num_attention_heads, config.num_key_value_heads, config.rope_theta) == (
      4, 2, 1000.0)
  assert not config.tie_word_embeddings
  q = model.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy()
  qtype = gguf.GGMLQuantizationType.Q8_0
  q8 = gguf.quants.dequantize(gguf.quants.quantize(q, qtype), qtype)
  np.testing.assert_array_equal(params["layers_1"]["self_attn"]["q_proj"]["kernel"], q8.T)
  assert np.abs(q8 - q).max() < 0.01  # quantisation error only
  ids, mask = batch(config.vocab_size)
  ours = np.asarray(llama.Llama(config).apply({"params": params}, ids, attention_mask=mask))
  diff = np.abs(ours - torch_logits(model, ids, mask))[mask.astype(bool)].max()
  assert diff < 0.05  # Q8_0 rounding of every matrix


# ----------------------------------------------------------------------------- bad input

def test_missing_paths_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load_llama(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    pretrained.load_llama(str(tmp_path))
  config = llama.LlamaConfig.tiny()
  pretrained.save_llama(config, tiny_params(config), str(tmp_path / "m"))
  os.remove(tmp_path / "m" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    pretrained.load_llama(str(tmp_path / "m"))


def test_non_llama_config_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 10}))
  with pytest.raises(ValueError, match=r"config.json: not a LLaMA config: model_type='bert'"):
    pretrained.load_llama(str(tmp_path))


def test_truncated_safetensors_names_the_file(tmp_path):
  config = llama.LlamaConfig.tiny()
  pretrained.save_llama(config, tiny_params(config), str(tmp_path))
  file = tmp_path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors.*truncated"):
    pretrained.load_llama(str(tmp_path))


def test_config_that_does_not_match_the_weights_names_the_key(tmp_path):
  config = llama.LlamaConfig.tiny()
  pretrained.save_llama(config, tiny_params(config), str(tmp_path))
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, intermediate_size=96)))
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape"):
    pretrained.load_llama(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=1)))
  with pytest.raises(KeyError, match="not used by the model.*model.layers.1"):
    pretrained.load_llama(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=3)))
  with pytest.raises(KeyError, match="'model.layers.2.*is missing"):
    pretrained.load_llama(str(tmp_path))


def test_tied_config_with_a_different_head_is_refused(tmp_path):
  config = llama.LlamaConfig.tiny()
  pretrained.save_llama(config, tiny_params(config), str(tmp_path))
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, tie_word_embeddings=True)))
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    pretrained.load_llama(str(tmp_path))


def test_truncated_or_foreign_gguf_fails_clearly(tiny_gguf, tmp_path):
  path, _ = tiny_gguf
  data = path.read_bytes()
  for n in (100, len(data) // 2, len(data) - 7):
    bad = tmp_path / f"cut{n}.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match=f"cut{n}.gguf: cannot read the GGUF file.*truncated"):
      pretrained.load_llama(str(bad))
  (tmp_path / "text.gguf").write_text("hello")
  with pytest.raises(ValueError, match="not a GGUF file"):
    pretrained.load_llama(str(tmp_path / "text.gguf"))


def test_non_llama_gguf_is_refused(tmp_path):
  import gguf
  writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="general.architecture is 'bert'"):
    pretrained.load_llama(str(tmp_path / "bert.gguf"))
