"""The strict BERT conversion table: round trips through transformers, task-model key names,
and the errors a user sees for folders it cannot read."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from slim_jax.convert import pretrained
from slim_jax.convert import bert_hf
from slim_jax.models import bert


@pytest.fixture(scope="module")
def tiny():
  cfg = bert.BertConfig.tiny(vocab_size=50, hidden_size=16, num_attention_heads=2,
                             intermediate_size=24, max_position_embeddings=16)
  return cfg, bert.init_params(cfg, jax.random.key(0))


def assert_same_tree(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb)
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


def test_round_trip_through_transformers(tiny, tmp_path):
  import transformers
  cfg, params = tiny
  pretrained.save_bert(cfg, params, str(tmp_path / "ours"))
  model, info = transformers.BertModel.from_pretrained(str(tmp_path / "ours"),
                                                       output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  # Every table key arrives in the right place: the torch state dict equals our export.
  exported = load_file(str(tmp_path / "ours" / "model.safetensors"))
  state = {k: v.numpy() for k, v in model.state_dict().items() if k in exported}
  assert set(state) == set(exported)
  for key, value in exported.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  model.save_pretrained(str(tmp_path / "theirs"))
  cfg2, params2, tok = pretrained.load_bert(str(tmp_path / "theirs"))
  assert tok is None
  assert cfg2 == cfg
  assert_same_tree(params, params2)


def rewrite(folder, fn):
  file = os.path.join(folder, "model.safetensors")
  tensors = fn(load_file(file))
  save_file(tensors, file, metadata={"format": "pt"})


def test_task_model_names_and_old_layernorm_names(tiny, tmp_path):
  cfg, params = tiny
  folder = str(tmp_path)
  pretrained.save_bert(cfg, params, folder)

  def to_pretraining(t):
    out = {}
    for k, v in t.items():
      k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                   "LayerNorm.beta")
      out["bert." + k] = v
    out["cls.predictions.bias"] = np.zeros(cfg.vocab_size, np.float32)
    out["bert.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    return out

  rewrite(folder, to_pretraining)
  _, loaded, _ = pretrained.load_bert(folder)
  assert_same_tree(params, loaded)


def test_no_pooler_weights_means_no_pooler(tiny, tmp_path):
  cfg, params = tiny
  folder = str(tmp_path)
  pretrained.save_bert(cfg, params, folder)
  rewrite(folder, lambda t: {k: v for k, v in t.items() if not k.startswith("pooler.")})
  cfg2, loaded, _ = pretrained.load_bert(folder)
  assert not cfg2.add_pooling_layer and "pooler" not in loaded


def test_missing_extra_and_misshaped_tensors_are_named(tiny, tmp_path):
  cfg, params = tiny
  folder = str(tmp_path)
  pretrained.save_bert(cfg, params, folder)
  original = load_file(os.path.join(folder, "model.safetensors"))

  rewrite(folder, lambda t: {k: v for k, v in t.items()
                             if k != "encoder.layer.1.output.dense.bias"})
  with pytest.raises(KeyError, match="encoder.layer.1.output.dense.bias"):
    pretrained.load_bert(folder)

  rewrite(folder, lambda t: {**original, "encoder.layer.9.output.dense.bias": np.zeros(16)})
  with pytest.raises(KeyError, match="not used by the model"):
    pretrained.load_bert(folder)

  rewrite(folder, lambda t: {**original,
                             "encoder.layer.0.intermediate.dense.weight": np.zeros((25, 16))})
  with pytest.raises(ValueError, match="encoder.layer.0.intermediate.dense.weight"):
    pretrained.load_bert(folder)


def test_unreadable_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a folder"):
    pretrained.load_bert(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text(json.dumps(bert.BertConfig.tiny().to_hf_config()
                                                   .to_dict()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin is not read"):
    pretrained.load_bert(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="cannot read safetensors"):
    pretrained.load_bert(str(tmp_path))


def test_config_errors_name_the_file(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="config.json: not a BERT config"):
    pretrained.load_bert(str(tmp_path))


def test_table_covers_every_parameter(tiny):
  cfg, params = tiny
  assert set(bert_hf.table(cfg)) == set(traverse_util.flatten_dict(params))
