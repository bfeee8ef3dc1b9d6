"""Functional LoRA: targets, zero start, adapter-only gradients, merge, PEFT format and parity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from slim_jax.models import lora
from slim_jax.models.layers import Linear


class _Block(nn.Module):
  """Named like a LLaMA layer: attention projections and an MLP, all `Linear`."""
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(lora_scale=self.lora_scale, lora_dropout=self.lora_dropout)
    for i in range(2):
      x = _Layer(name=f"layers_{i}", **kw)(x, deterministic)
    return x


class _Layer(nn.Module):
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(lora_scale=self.lora_scale, lora_dropout=self.lora_dropout)
    attn = _Attn(name="self_attn", **kw)(x, deterministic)
    x = x + attn
    h = Linear(12, ("embed", "mlp"), name="up_proj", **kw)(x, deterministic)
    return x + Linear(8, ("mlp", "embed"), name="down_proj", **kw)(nn.relu(h), deterministic)


class _Attn(nn.Module):
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(lora_scale=self.lora_scale, lora_dropout=self.lora_dropout)
    q = Linear(8, ("embed", "heads"), name="q_proj", **kw)(x, deterministic)
    v = Linear(8, ("embed", "heads"), name="v_proj", **kw)(x, deterministic)
    return Linear(8, ("heads", "embed"), name="o_proj", **kw)(jnp.tanh(q) * v, deterministic)


def _init(model, x):
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  params = nn.unbox(model.init(jax.random.key(0), x))["params"]
  return params, nn.get_partition_spec(abstract)["params"]


def test_init_lora_targets_shapes_and_zero_start():
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  params, _ = _init(_Block(), x)
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  adapter = lora.init_lora(params, spec, jax.random.key(2))
  flat = traverse_util.flatten_dict(adapter)
  assert set(flat) == {(f"layers_{i}", "self_attn", p, ab) for i in range(2)
                       for p in ("q_proj", "v_proj", "o_proj") for ab in "ab"}
  assert flat[("layers_0", "self_attn", "q_proj", "a")].shape == (8, 4)
  assert flat[("layers_0", "self_attn", "o_proj", "b")].shape == (4, 8)
  assert all(np.all(v == 0) for k, v in flat.items() if k[-1] == "b")
  assert all(np.any(v != 0) for k, v in flat.items() if k[-1] == "a")
  base = _Block().apply({"params": params}, x)
  same = _Block(lora_scale=spec.scale).apply({"params": params, "lora": adapter}, x)
  np.testing.assert_array_equal(base, same)

  mlp = lora.init_lora(params, lora.LoraSpec(targets=lora.MLP_TARGETS), jax.random.key(0))
  assert {k[1] for k in traverse_util.flatten_dict(mlp)} == {"up_proj", "down_proj"}
  one = lora.init_lora(params, lora.LoraSpec(targets=(r"layers_1/self_attn/q_proj",)),
                       jax.random.key(0))
  assert list(traverse_util.flatten_dict(one)) == [("layers_1", "self_attn", "q_proj", "a"),
                                                   ("layers_1", "self_attn", "q_proj", "b")]
  with pytest.raises(ValueError, match="match no kernel"):
    lora.init_lora(params, lora.LoraSpec(targets=("nope",)), jax.random.key(0))


def test_gradients_reach_adapter_only_and_merge_matches():
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  params, specs = _init(_Block(), x)
  spec = lora.LoraSpec(rank=2, alpha=4.0)
  model = _Block(lora_scale=spec.scale)
  adapter = lora.init_lora(params, spec, jax.random.key(2))

  def loss(a):
    return jnp.sum(model.apply({"params": params, "lora": a}, x) ** 2)

  grads = jax.grad(loss)(adapter)
  assert jax.tree.structure(grads) == jax.tree.structure(adapter)
  # b starts at zero, so only b gets a gradient at first (d/da = dy/d(xa) b = 0).
  assert all(np.any(g != 0) for k, g in traverse_util.flatten_dict(grads).items() if k[-1] == "b")
  adapter = jax.tree.map(lambda p, g: p - 5.0 * g, adapter, grads)
  y_lora = model.apply({"params": params, "lora": adapter}, x)
  y_base = model.apply({"params": params}, x)
  assert np.abs(y_lora - y_base).max() > 1e-3
  merged = lora.merge(params, adapter, spec.scale)
  np.testing.assert_allclose(model.apply({"params": merged}, x), y_lora, rtol=1e-5, atol=1e-5)

  logical = lora.lora_partition_specs(adapter, specs)
  assert logical["layers_0"]["self_attn"]["q_proj"]["a"] == jax.sharding.PartitionSpec(
      "embed", "lora_rank")
  assert logical["layers_0"]["self_attn"]["o_proj"]["b"] == jax.sharding.PartitionSpec(
      "lora_rank", "embed")


def test_dropout_only_when_not_deterministic():
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  params, _ = _init(_Block(), x)
  spec = lora.LoraSpec(rank=2, dropout=0.5)
  adapter = jax.tree.map(lambda v: v + 0.3, lora.init_lora(params, spec, jax.random.key(2)))
  model = _Block(lora_scale=spec.scale, lora_dropout=spec.dropout)
  variables = {"params": params, "lora": adapter}
  y1 = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  y2 = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(y1, y2)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_hf_names_round_trip():
  path = ("layers_12", "self_attn", "q_proj")
  assert lora.hf_module_name(path) == "model.layers.12.self_attn.q_proj"
  assert lora.flax_module_path("model.layers.12.self_attn.q_proj") == path
  assert lora.hf_module_name(("lm_head",)) == "lm_head"


def test_peft_export_import_round_trip(tmp_path):
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  params, _ = _init(_Block(), x)
  spec = lora.LoraSpec(rank=3, alpha=6.0, dropout=0.1)
  adapter = jax.tree.map(lambda v: v + 0.5, lora.init_lora(params, spec, jax.random.key(2)))
  lora.save_peft(str(tmp_path), adapter, spec, "some/base", num_layers=2)
  config = json.load(open(tmp_path / lora.PEFT_CONFIG_FILE))
  assert config["r"] == 3 and config["lora_alpha"] == 6.0
  assert config["target_modules"] == ["o_proj", "q_proj", "v_proj"]
  assert "layers_to_transform" not in config
  from safetensors.numpy import load_file
  tensors = load_file(str(tmp_path / lora.PEFT_WEIGHTS_FILE))
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (3, 8)
  assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (8, 3)
  back, spec_back = lora.load_peft(str(tmp_path))
  assert spec_back.rank == 3 and spec_back.scale == spec.scale
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, adapter))

  only_first = {"layers_0": adapter["layers_0"]}
  lora.save_peft(str(tmp_path / "first"), only_first, spec, num_layers=2)
  config = json.load(open(tmp_path / "first" / lora.PEFT_CONFIG_FILE))
  assert config["layers_to_transform"] == [0]
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    lora.load_peft(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------
# Parity with Hugging Face PEFT on a tiny random LlamaForCausalLM.

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
      rope_theta=10000.0, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(config).eval()
  folder = str(tmp_path_factory.mktemp("tiny_llama"))
  model.save_pretrained(folder)
  return folder


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 128, (2, 10)).astype(np.int32)
  mask = np.ones((2, 10), np.int32)
  mask[1, 7:] = 0  # right padding in the second row
  return ids, mask


def _hf_logits(model, ids, mask):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long())
  return out.logits.numpy()


def _random_adapter(params, spec, seed):
  """Random a and b (b != 0, so that the adapter changes the output)."""
  adapter = lora.init_lora(params, spec, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [np.asarray(0.2 * jax.random.normal(k, x.shape))
                                      for k, x in zip(keys, leaves)])


def test_peft_export_loads_in_peft_with_same_logits(tiny_hf, tmp_path):
  import peft
  import transformers
  from slim_jax.convert import pretrained
  from slim_jax.models import llama
  cfg, params, _ = pretrained.load_llama(tiny_hf)
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=lora.ATTENTION_TARGETS + lora.MLP_TARGETS)
  adapter = _random_adapter(params, spec, seed=3)
  ids, mask = _inputs()
  ours = np.asarray(llama.Llama(cfg, lora_scale=spec.scale).apply(
      {"params": params, "lora": adapter}, ids, attention_mask=mask))
  base = np.asarray(llama.Llama(cfg).apply({"params": params}, ids, attention_mask=mask))

  lora.save_peft(str(tmp_path), adapter, spec, base_model_name_or_path=tiny_hf,
                 num_layers=cfg.num_hidden_layers)
  hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf).eval()
  hf_base = _hf_logits(hf, ids, mask)
  peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
  theirs = _hf_logits(peft_model, ids, mask)
  valid = mask.astype(bool)
  diff = np.abs(ours - theirs)[valid].max()
  print(f"max |ours - PEFT| = {diff:.2e}; adapter effect {np.abs(ours - base)[valid].max():.3f}")
  assert diff <= 1e-4
  assert np.abs(ours - base)[valid].max() > 1e-2  # the adapter does something
  assert np.abs(hf_base - base)[valid].max() <= 1e-4
  merged = lora.merge(params, adapter, spec.scale)
  np.testing.assert_allclose(
      llama.Llama(cfg).apply({"params": merged}, ids, attention_mask=mask)[valid],
      ours[valid], atol=1e-4)


def test_load_peft_reads_an_adapter_peft_wrote(tiny_hf, tmp_path):
  import peft
  import torch
  import transformers
  from slim_jax.convert import pretrained
  from slim_jax.models import llama
  hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf).eval()
  config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                           lora_dropout=0.0, task_type="CAUSAL_LM")
  model = peft.get_peft_model(hf, config)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.normal_(0, 0.2)
  model.save_pretrained(str(tmp_path))
  adapter, spec = lora.load_peft(str(tmp_path))
  assert spec.rank == 4 and spec.scale == 3.0
  assert set(adapter["layers_1"]) == {"self_attn", "mlp"}
  cfg, params, _ = pretrained.load_llama(tiny_hf)
  ids, mask = _inputs()
  ours = np.asarray(llama.Llama(cfg, lora_scale=spec.scale).apply(
      {"params": params, "lora": adapter}, ids, attention_mask=mask))
  theirs = _hf_logits(model.eval(), ids, mask)
  valid = mask.astype(bool)
  assert np.abs(ours - theirs)[valid].max() <= 1e-4
