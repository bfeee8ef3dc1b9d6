"""Flax LLaMA vs transformers' PyTorch LlamaForCausalLM on tiny random models (float32, CPU).

Each case builds a random HF model, saves it as a Hugging Face folder, loads it with
`pretrained.load_llama` and compares logits on left-padded batches; plus KV-cache decoding
against full recomputation, the parameter tree contract, bfloat16 and remat.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from slim_jax.convert import pretrained
from slim_jax.models import llama

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def make_hf(tmp_path, kv_heads=2, tied=False, rope_scaling=None, seed=0):
  """A random tiny LlamaForCausalLM saved to tmp_path; returns (folder, torch model)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  rope = {"rope_type": "default", "rope_theta": 500.0}
  if rope_scaling:
    rope = {**rope_scaling, "rope_theta": 500.0}
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
      tie_word_embeddings=tied, rope_parameters=rope, rms_norm_eps=1e-5)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms away from 1, so that their parity is tested
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(tmp_path)
  return str(tmp_path), model


def left_padded_batch(vocab=97, lengths=(11, 7, 3, 11), seed=0):
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = rng.integers(0, vocab, (len(lengths), t)).astype(np.int32)
  mask = np.zeros((len(lengths), t), np.int32)
  for row, n in enumerate(lengths):
    mask[row, t - n:] = 1
  return ids, mask


def hf_logits(model, ids, mask):
  """HF logits with the positions HF generate uses for left padding (cumsum - 1)."""
  import torch
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long(),
                position_ids=torch.from_numpy(positions).long())
  return out.logits.numpy()


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rope", ["none", "llama3"])
def test_logits_match_transformers(tmp_path, kv_heads, tied, rope):
  folder, model = make_hf(tmp_path, kv_heads, tied, LLAMA3_ROPE if rope == "llama3" else None)
  config, params, tokenizer = pretrained.load_llama(folder)
  assert tokenizer is None and config.tie_word_embeddings == tied
  assert ("lm_head" in params) == (not tied)
  ids, mask = left_padded_batch()
  ours = np.asarray(llama.Llama(config).apply({"params": params}, ids, attention_mask=mask))
  theirs = hf_logits(model, ids, mask)
  valid = mask.astype(bool)
  diff = np.abs(ours - theirs)[valid].max()
  print(f"kv_heads={kv_heads} tied={tied} rope={rope}: max |diff| = {diff:.2e}")
  assert diff <= 1e-4
  assert np.isfinite(ours).all()


def test_padding_does_not_change_real_token_logits(tmp_path):
  folder, _ = make_hf(tmp_path)
  config, params, _ = pretrained.load_llama(folder)
  ids, mask = left_padded_batch(lengths=(11, 5))
  model = llama.Llama(config)
  padded = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  alone = np.asarray(model.apply({"params": params}, ids[1:, -5:]))
  np.testing.assert_allclose(padded[1, -5:], alone[0], atol=1e-5)


def test_linear_rope_scaling_matches_transformers(tmp_path):
  folder, model = make_hf(tmp_path, rope_scaling={"rope_type": "linear", "factor": 4.0})
  config, params, _ = pretrained.load_llama(folder)
  assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
  ids, mask = left_padded_batch()
  ours = np.asarray(llama.Llama(config).apply({"params": params}, ids, attention_mask=mask))
  assert np.abs(ours - hf_logits(model, ids, mask))[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("prefill_chunk", [64, 4])
def test_kv_cache_decoding_equals_full_recomputation(prefill_chunk, monkeypatch):
  """Prefill then decode one token at a time: the logits of the whole sequences. With
  prefill blocks of 4 queries, the 9-slot prompt runs as blocks of 4, 4 and 1."""
  monkeypatch.setattr(llama, "PREFILL_QUERY_CHUNK", prefill_chunk)
  config = llama.LlamaConfig.tiny(vocab_size=61, num_key_value_heads=1)
  model = llama.Llama(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  ids, mask = left_padded_batch(vocab=61, lengths=(9, 4, 6))
  b, p = ids.shape
  steps, s = 5, 24
  rng = np.random.default_rng(1)
  new = rng.integers(0, 61, (b, steps)).astype(np.int32)
  full_ids = np.concatenate([ids, new], axis=1)
  full_mask = np.concatenate([mask, np.ones((b, steps), np.int32)], axis=1)
  full = np.asarray(model.apply({"params": params}, full_ids, attention_mask=full_mask))

  cache = llama.init_cache(config, b, s)
  cache_mask = np.zeros((b, s), bool)
  cache_mask[:, :p] = mask
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  logits, cache = model.apply({"params": params}, ids, attention_mask=cache_mask,
                              positions=positions, cache=cache, cache_index=0)
  got = [np.asarray(logits)]
  next_pos = mask.sum(-1)
  for step in range(steps):
    cache_mask[:, p + step] = True
    logits, cache = model.apply({"params": params}, new[:, step:step + 1],
                                attention_mask=cache_mask, positions=next_pos[:, None] + step,
                                cache=cache, cache_index=p + step)
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  valid = full_mask.astype(bool)
  np.testing.assert_allclose(got[valid], full[valid], atol=1e-5)
  last, _ = model.apply({"params": params}, ids, attention_mask=np.pad(mask, ((0, 0), (0, 4))),
                        positions=positions, cache=llama.init_cache(config, b, p + 4),
                        cache_index=0, last_only=True)
  np.testing.assert_allclose(np.asarray(last)[:, 0], full[:, p - 1], atol=1e-5)


@pytest.mark.parametrize("kv_heads,prefill_chunk", [(1, 64), (2, 64), (2, 2)])
def test_a_prefix_held_once_equals_the_prefix_in_every_rows_cache(kv_heads, prefill_chunk,
                                                                 monkeypatch):
  """Rows that share L leading tokens: their keys and values held once ([1, K, L, H]) and
  read by every row give the logits of the whole sequences, in prefill and decode."""
  monkeypatch.setattr(llama, "PREFILL_QUERY_CHUNK", prefill_chunk)
  config = llama.LlamaConfig.tiny(vocab_size=61, num_key_value_heads=kv_heads)
  model = llama.Llama(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  rng = np.random.default_rng(2)
  length, steps = 6, 3
  prefix_ids = rng.integers(0, 61, (1, length)).astype(np.int32)
  tails, tail_mask = left_padded_batch(vocab=61, lengths=(5, 2, 4))
  b, p = tails.shape
  new = rng.integers(0, 61, (b, steps)).astype(np.int32)
  # Reference: each row's prefix + tail + new tokens, left-padded as one sequence.
  width = length + p + steps
  full_ids, full_mask = np.zeros((b, width), np.int32), np.zeros((b, width), np.int32)
  for row in range(b):
    seq = [*prefix_ids[0], *tails[row][tail_mask[row] == 1], *new[row]]
    full_ids[row, width - len(seq):], full_mask[row, width - len(seq):] = seq, 1
  full = np.asarray(model.apply({"params": params}, full_ids, attention_mask=full_mask))
  _, prefix = model.apply({"params": params}, prefix_ids, attention_mask=np.ones((1, length)),
                          positions=np.arange(length)[None],
                          cache=llama.init_cache(config, 1, length), cache_index=0)
  s = p + steps
  cache_mask = np.zeros((b, s), bool)
  cache_mask[:, :p] = tail_mask
  positions = length + np.maximum(np.cumsum(tail_mask, -1) - 1, 0)
  logits, cache = model.apply({"params": params}, tails, attention_mask=cache_mask,
                              positions=positions, cache=llama.init_cache(config, b, s),
                              cache_index=0, last_only=True, prefix=prefix)
  got = [np.asarray(logits)[:, 0]]
  next_pos = length + tail_mask.sum(-1)
  for step in range(steps - 1):
    cache_mask[:, p + step] = True
    logits, cache = model.apply({"params": params}, new[:, step:step + 1],
                                attention_mask=cache_mask, positions=next_pos[:, None] + step,
                                cache=cache, cache_index=p + step, prefix=prefix)
    got.append(np.asarray(logits)[:, 0])
  want = full[:, -steps - 1:-1]  # predictions after the last tail token and each new one
  np.testing.assert_allclose(np.stack(got, axis=1), want, atol=1e-5)


def test_a_prefill_in_two_parts_reads_the_slots_before_it(monkeypatch):
  """A prompt prefilled as two calls (slots 0-4, then 5-10, in blocks of 2 queries): the
  second part's blocks read the first part's slots and their own, and every logit equals
  the full sequence's."""
  monkeypatch.setattr(llama, "PREFILL_QUERY_CHUNK", 2)
  config = llama.LlamaConfig.tiny(vocab_size=61)
  model = llama.Llama(config)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  ids, mask = left_padded_batch(vocab=61, lengths=(11, 8))
  full = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
  s, split = 14, 5
  cache = llama.init_cache(config, 2, s)
  cache_mask = np.zeros((2, s), bool)
  cache_mask[:, :ids.shape[1]] = mask
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  got = []
  for lo, hi in ((0, split), (split, ids.shape[1])):
    logits, cache = model.apply({"params": params}, ids[:, lo:hi], attention_mask=cache_mask,
                                positions=positions[:, lo:hi], cache=cache, cache_index=lo)
    got.append(np.asarray(logits))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(got, axis=1)[valid], full[valid], atol=1e-5)


def test_a_bfloat16_cache_is_written_as_bits_to_the_same_values():
  cache = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8, 4)), jnp.bfloat16)
  new = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 2, 4)), jnp.float32)
  got = llama._write_cache(cache, new, (0, 0, 5, 0))
  want = jax.lax.dynamic_update_slice(cache, new.astype(jnp.bfloat16), (0, 0, 5, 0))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_the_value_cache_is_float32_on_a_cpu():
  cache = llama.init_cache(llama.LlamaConfig.tiny(), 2, 8, jnp.bfloat16,
                           llama.value_cache_dtype(jnp.bfloat16))
  assert cache[0][0].dtype == jnp.bfloat16
  assert cache[0][1].dtype == (jnp.float32 if jax.default_backend() == "cpu"
                               else jnp.bfloat16)


def test_parameter_tree_names_shapes_and_axes():
  config = llama.LlamaConfig.tiny(num_hidden_layers=3)
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  nh, kh = config.num_attention_heads * config.head_dim, config.num_key_value_heads * \
      config.head_dim
  shapes = llama.param_shapes(config)
  want = {("embed_tokens", "embedding"): (v, d), ("norm", "scale"): (d,),
          ("lm_head", "kernel"): (d, v)}
  for i in range(3):
    want.update({
        (f"layers_{i}", "input_layernorm", "scale"): (d,),
        (f"layers_{i}", "post_attention_layernorm", "scale"): (d,),
        (f"layers_{i}", "self_attn", "q_proj", "kernel"): (d, nh),
        (f"layers_{i}", "self_attn", "k_proj", "kernel"): (d, kh),
        (f"layers_{i}", "self_attn", "v_proj", "kernel"): (d, kh),
        (f"layers_{i}", "self_attn", "o_proj", "kernel"): (nh, d),
        (f"layers_{i}", "mlp", "gate_proj", "kernel"): (d, f),
        (f"layers_{i}", "mlp", "up_proj", "kernel"): (d, f),
        (f"layers_{i}", "mlp", "down_proj", "kernel"): (f, d)})
  assert shapes == want
  specs = llama.param_partition_specs(config)
  assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["layers_1"]["self_attn"]["k_proj"]["kernel"]) == ("embed", "kv_heads")
  assert tuple(specs["layers_1"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
  assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
  tied = llama.param_shapes(dataclasses.replace(config, tie_word_embeddings=True))
  assert ("lm_head", "kernel") not in tied


def test_config_round_trips_through_transformers():
  config = llama.LlamaConfig.tiny(rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=64,
                                  eos_token_id=(2, 3), tie_word_embeddings=True)
  back = llama.LlamaConfig.from_hf_config(config.to_hf_config())
  assert back == config
  assert hash(back) == hash(config)
  assert llama.LlamaConfig.from_hf_config(  # transformers 4 style keys
      {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
       "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5.0,
       "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling == {
           "rope_type": "linear", "factor": 2.0}
  assert dataclasses.replace(config, dtype=jnp.bfloat16).dtype == "bfloat16"
  with pytest.raises(ValueError, match="not a LLaMA config"):
    llama.LlamaConfig.from_hf_config({"model_type": "bert", "vocab_size": 10})
  with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
    llama.LlamaConfig.tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_bfloat16_and_remat_run_and_stay_close():
  config = llama.LlamaConfig.tiny()
  ids, mask = left_padded_batch(vocab=config.vocab_size)
  params = nn.unbox(llama.Llama(config).init(jax.random.key(0), ids))["params"]
  ref = np.asarray(llama.Llama(config).apply({"params": params}, ids, attention_mask=mask))
  bf16 = dataclasses.replace(config, dtype="bfloat16")
  low = llama.Llama(bf16).apply({"params": params}, ids, attention_mask=mask)
  assert low.dtype == jnp.float32
  valid = mask.astype(bool)
  assert np.abs(np.asarray(low) - ref)[valid].max() < 0.05

  remat = llama.Llama(dataclasses.replace(config, remat=True))

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, ids, attention_mask=mask) ** 2)

  g_ref = jax.grad(loss)(params, llama.Llama(config))
  g_remat = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_ref, g_remat)


def test_query_chunked_causal_attention_matches_transformers(tmp_path, monkeypatch):
  """Sequences longer than one query chunk take the chunked path (each chunk against the
  keys up to its end): same logits as HF, left padding included, chunk boundary mid-row."""
  monkeypatch.setattr(llama, "QUERY_CHUNK", 4)
  folder, model = make_hf(tmp_path, kv_heads=2)
  config, params, _ = pretrained.load_llama(folder)
  ids, mask = left_padded_batch(lengths=(11, 7, 3, 11))  # T = 11: chunks 4, 4, 3
  ours = np.asarray(llama.Llama(config).apply({"params": params}, ids, attention_mask=mask))
  theirs = hf_logits(model, ids, mask)
  assert np.abs(ours - theirs)[mask.astype(bool)].max() <= 1e-4


def _rotate_half_reference(x, cos, sin):
  """transformers' apply_rotary_pos_emb for x [B, T, N, H], cos/sin [B, T, H]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


def test_rope_gradients_equal_autodiff_of_the_rotation():
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (2, 5, 3, 8))
  angles = jax.random.uniform(keys[1], (2, 5, 4), maxval=6.0)
  angles = jnp.concatenate([angles, angles], axis=-1)  # rotate_half layout: halves alike
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  g = jax.random.normal(keys[2], x.shape)
  out, vjp = jax.vjp(llama.apply_rope, x, cos, sin)
  ref_out, ref_vjp = jax.vjp(_rotate_half_reference, x, cos, sin)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
  grads, ref_grads = vjp(g), ref_vjp(g)
  np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)
  # The reference reads both halves of cos and sin, apply_rope the first: equal sums.
  for grad, ref in zip(grads[1:], ref_grads[1:]):
    np.testing.assert_allclose(grad[..., :4] + grad[..., 4:], ref[..., :4] + ref[..., 4:],
                               rtol=1e-5, atol=1e-5)


def test_the_rope_table_equals_cos_and_sin_of_the_angles():
  config = llama.LlamaConfig.tiny()
  positions = jnp.asarray([[0, 1, 2, 30], [5, 5, 6, 7]])
  cos, sin = llama.rope_cos_sin(config, positions, table_size=31)
  angles = np.asarray(positions, np.float64)[..., None] * llama.rope_inv_freq(config)
  angles = np.concatenate([angles, angles], axis=-1)
  np.testing.assert_allclose(cos, np.cos(angles), atol=2e-6)
  np.testing.assert_allclose(sin, np.sin(angles), atol=2e-6)
