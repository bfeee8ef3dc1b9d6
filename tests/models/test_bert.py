"""Flax BERT vs transformers' PyTorch BertModel (float32, CPU).

Tiny random models with right padding (last hidden state and pooler within 1e-5) in several
shapes and activations, the real all-MiniLM-L6-v2 (within 1e-4), the parameter tree
contract, padding invariance, bfloat16 and dropout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slim_jax import assets
from slim_jax.convert import pretrained
from slim_jax.models import bert


def make_hf(tmp_path, seed=0, **overrides):
  """A random tiny BertModel saved to tmp_path; returns (folder, torch model)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  fields = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=80, max_position_embeddings=40, type_vocab_size=2,
                layer_norm_eps=1e-12)
  fields.update(overrides)
  model = transformers.BertModel(transformers.BertConfig(**fields)).eval()
  with torch.no_grad():  # norms and biases away from 1 and 0, so their parity is tested
    for name, p in model.named_parameters():
      if "LayerNorm.weight" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
  model.save_pretrained(tmp_path)
  return str(tmp_path), model


def right_padded_batch(vocab=99, lengths=(13, 7, 2, 13), seed=0, types=True):
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = rng.integers(1, vocab, (len(lengths), t)).astype(np.int32)
  mask = np.zeros((len(lengths), t), np.int32)
  for row, n in enumerate(lengths):
    mask[row, :n] = 1
  ids = np.where(mask == 1, ids, 0).astype(np.int32)
  token_types = (rng.integers(0, 2, ids.shape) * mask).astype(np.int32) if types else None
  return ids, mask, token_types


def run(cfg, params, ids, mask=None, types=None, **kw):
  """Bert(cfg).apply under jit (eager dispatch of every op is slow on CPU)."""
  fn = jax.jit(lambda p, i, m, t: bert.Bert(cfg).apply({"params": p}, i, attention_mask=m,
                                                       token_type_ids=t, **kw))
  return fn(params, ids, mask, types)


def hf_outputs(model, ids, mask, token_types):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                token_type_ids=None if token_types is None
                else torch.from_numpy(token_types).long())
  pooled = None if out.pooler_output is None else out.pooler_output.numpy()
  return out.last_hidden_state.numpy(), pooled


@pytest.mark.parametrize("overrides", [
    {},
    {"hidden_act": "gelu_new", "num_attention_heads": 6},
    {"hidden_act": "relu", "num_hidden_layers": 3, "layer_norm_eps": 1e-5},
], ids=["gelu", "gelu_new-6heads", "relu-3layers"])
def test_tiny_parity_with_padding(tmp_path, overrides):
  folder, model = make_hf(tmp_path, **overrides)
  cfg, params, _ = pretrained.load_bert(folder)
  assert cfg.add_pooling_layer
  ids, mask, types = right_padded_batch()
  want_hidden, want_pooled = hf_outputs(model, ids, mask, types)
  hidden, pooled = run(cfg, params, ids, mask, types, return_pooled=True)
  assert hidden.shape == (4, 13, 48)
  np.testing.assert_allclose(np.asarray(hidden), want_hidden, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, atol=1e-5, rtol=0)


def test_padding_does_not_change_real_tokens():
  cfg = bert.BertConfig.tiny()
  params = bert.init_params(cfg, jax.random.key(0))
  ids, mask, _ = right_padded_batch(vocab=cfg.vocab_size, lengths=(9, 5), types=False)
  full = run(cfg, params, ids, mask)
  alone = run(cfg, params, ids[1:, :5], mask[1:, :5])
  np.testing.assert_allclose(np.asarray(full[1, :5]), np.asarray(alone[0]), atol=1e-6)
  # Padding changes something when unmasked: the mask is really applied.
  unmasked = run(cfg, params, ids, np.ones_like(mask))
  assert np.abs(np.asarray(unmasked[1, :5]) - np.asarray(alone[0])).max() > 1e-3


def test_param_tree_contract():
  cfg = bert.BertConfig.tiny(num_hidden_layers=1)
  shapes = bert.param_shapes(cfg)
  d, f = cfg.hidden_size, cfg.intermediate_size
  assert shapes[("embeddings", "word_embeddings", "embedding")] == (cfg.vocab_size, d)
  assert shapes[("layers_0", "attention", "query", "kernel")] == (d, d)
  assert shapes[("layers_0", "intermediate", "kernel")] == (d, f)
  assert shapes[("layers_0", "output", "kernel")] == (f, d)
  assert shapes[("pooler", "kernel")] == (d, d)
  assert ("pooler", "kernel") not in bert.param_shapes(
      bert.BertConfig.tiny(add_pooling_layer=False))
  specs = bert.param_partition_specs(cfg)
  assert tuple(specs["layers_0"]["attention"]["query"]["kernel"]) == ("embed", "heads")
  assert tuple(specs["layers_0"]["intermediate"]["kernel"]) == ("embed", "mlp")
  assert tuple(specs["embeddings"]["word_embeddings"]["embedding"]) == ("vocab", "embed")


def test_bfloat16_close_to_float32():
  cfg = bert.BertConfig.tiny()
  params = bert.init_params(cfg, jax.random.key(1))
  ids, mask, _ = right_padded_batch(vocab=cfg.vocab_size, types=False)
  f32 = run(cfg, params, ids, mask)
  b16 = run(bert.BertConfig.tiny(dtype="bfloat16"), params, ids, mask)
  assert b16.dtype == jnp.bfloat16
  assert np.abs(np.asarray(b16, np.float32) - np.asarray(f32)).max() < 0.1


def test_dropout_only_when_not_deterministic():
  cfg = bert.BertConfig.tiny(dropout_rate=0.5)
  params = bert.init_params(cfg, jax.random.key(0))
  ids, mask, _ = right_padded_batch(vocab=cfg.vocab_size, types=False)
  a = run(cfg, params, ids, mask)
  b = run(cfg, params, ids, mask)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = jax.jit(lambda p: bert.Bert(cfg).apply({"params": p}, ids, attention_mask=mask,
                                             deterministic=False,
                                             rngs={"dropout": jax.random.key(3)}))(params)
  assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-2


def test_too_long_input_is_refused():
  cfg = bert.BertConfig.tiny(max_position_embeddings=8)
  params = bert.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="max_position_embeddings 8"):
    run(cfg, params, np.zeros((1, 9), np.int32))


def test_config_round_trip():
  cfg = bert.BertConfig.tiny(hidden_act="gelu_new", layer_norm_eps=1e-6)
  back = bert.BertConfig.from_hf_config(cfg.to_hf_config())
  assert back == cfg
  with pytest.raises(ValueError, match="not a BERT config"):
    bert.BertConfig.from_hf_config({"model_type": "llama", "architectures": ["Llama"]})


def minilm_path() -> str:
  return assets.minilm_folder()


def test_minilm_parity():
  """The real all-MiniLM-L6-v2 against transformers on a padded batch of real sentences."""
  import transformers
  folder = minilm_path()
  cfg, params, tok = pretrained.load_bert(folder)
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
  model = transformers.BertModel.from_pretrained(folder).eval()
  sentences = ["A wireless mouse with a long battery life.",
               "Title: The Legend of Zelda; Brand: Nintendo; Categories: Video Games, Action",
               "ok",
               "Step 1: The user likes strategy games and racing titles from well known "
               "studios, and buys accessories for the console soon after each game. " * 3]
  enc = tok(sentences, padding=True, return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  types = enc["token_type_ids"].astype(np.int32)
  want, want_pooled = hf_outputs(model, ids, mask, types)
  hidden, pooled = jax.jit(lambda p: bert.Bert(cfg).apply(
      {"params": p}, ids, attention_mask=mask, token_type_ids=types, return_pooled=True))(
          params)
  np.testing.assert_allclose(np.asarray(hidden), want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), want_pooled, atol=1e-4, rtol=0)
