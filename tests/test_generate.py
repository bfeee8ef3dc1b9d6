"""Batched KV-cache generation: greedy equals full recomputation and Hugging Face generate,
batch composition does not change a row, shapes stay bucketed, sampling, stop strings,
streaming, chat and LoRA."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llama_fixtures import smollm2_gguf
from slim_jax import generate
from slim_jax.convert import pretrained
from slim_jax.models import llama


@pytest.fixture(scope="module")
def tiny():
  config = llama.LlamaConfig.tiny(vocab_size=97, eos_token_id=2, pad_token_id=0)
  params = nn.unbox(llama.Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return config, params["params"]


@pytest.fixture(scope="module")
def generator(tiny):
  config, params = tiny
  return generate.Generator(config, params, None, max_batch_size=4, max_seq_len=128)


def greedy_reference(config, params, prompt, max_new, width=48):
  """Greedy decoding by recomputing the whole (right-padded) sequence at every step."""
  ids, out = list(prompt), []
  forward = jax.jit(lambda p, x, m: llama.Llama(config).apply({"params": p}, x,
                                                               attention_mask=m))
  for _ in range(max_new):
    x = np.zeros((1, width), np.int32)
    x[0, :len(ids)] = ids
    m = (np.arange(width) < len(ids))[None].astype(np.int32)
    token = int(np.argmax(forward(params, x, m)[0, len(ids) - 1]))
    if token in config.eos_token_ids:
      break
    out.append(token)
    ids.append(token)
  return out


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]


def test_greedy_equals_full_recomputation_and_is_batch_invariant(tiny, generator):
  config, params = tiny
  outs = generator.generate(PROMPTS, generate.SamplingParams(max_new_tokens=20))
  for prompt, out in zip(PROMPTS, outs):
    ref = greedy_reference(config, params, prompt, 20)
    assert out.token_ids == ref
    assert out.prompt_tokens == len(prompt) and out.completion_tokens == len(ref)
    assert out.finish_reason == ("length" if len(ref) == 20 else "stop")
  alone = generator.generate(PROMPTS[1:2], generate.SamplingParams(max_new_tokens=20))
  assert alone[0].token_ids == outs[1].token_ids


def test_prompts_batched_by_length_come_back_in_order(tiny):
  """generate() batches prompts of similar length together; results, and should_stop's
  row numbers, stay those of the caller's order."""
  config, params = tiny
  gen = generate.Generator(config, params, None, max_batch_size=2, max_seq_len=128)
  prompts = [[5] * 9, [6, 7], [8] * 15, [9, 10, 11], [12] * 5]
  asked = set()
  stop_row = 2
  outs = gen.generate(prompts, generate.SamplingParams(max_new_tokens=6),
                      should_stop=lambda row: asked.add(row) or row == stop_row)
  assert asked == set(range(len(prompts)))
  for row, (prompt, out) in enumerate(zip(prompts, outs)):
    assert out.prompt_tokens == len(prompt)
    if row == stop_row:
      assert out.finish_reason == "cancelled"
    else:
      assert out.token_ids == greedy_reference(config, params, prompt, 6)


def test_prefill_a_few_rows_at_a_time_changes_nothing(tiny, generator):
  config, params = tiny
  chunked = generate.Generator(config, params, None, max_batch_size=4, max_seq_len=128,
                               share_prefix=False, prefill_chunk_tokens=16)  # 1 row a pass
  prompts = PROMPTS + [[20, 21, 22, 23, 24]]
  sampling = generate.SamplingParams(max_new_tokens=12)
  whole = generator.generate(prompts, sampling)
  assert [o.token_ids for o in chunked.generate(prompts, sampling)] == [
      o.token_ids for o in whole]


def test_no_recompile_within_a_bucket(generator):
  sampling = generate.SamplingParams(max_new_tokens=20)
  generator.generate(PROMPTS, sampling)
  sizes = (generate._prefill._cache_size(), generate._decode._cache_size())
  generator.generate([[3] * 12, [4, 5, 6, 7]], sampling)  # batch 2 -> bucket 2: new shape
  sizes2 = (generate._prefill._cache_size(), generate._decode._cache_size())
  generator.generate([[8] * 14, [9]], sampling)  # same buckets: no new program
  generator.generate([[7] * 3, [1, 2, 3], [4, 4]], sampling)  # batch bucket 4: seen
  assert (generate._prefill._cache_size(), generate._decode._cache_size()) == sizes2
  # A new batch shape: one prefill program; a decode program per cache size it grows
  # through (prompt bucket 16, 20 new tokens: 24, 32, 48 slots).
  assert sizes2[0] <= sizes[0] + 1 and sizes2[1] <= sizes[1] + 3


def test_cache_buckets_step_by_a_quarter_between_powers_of_two():
  assert [generate.cache_bucket(n) for n in (1, 17, 40, 64, 65, 81, 129, 513, 641, 700,
                                              1000, 1024, 1025)] == [
      16, 24, 48, 64, 80, 96, 160, 640, 768, 768, 1024, 1024, 1280]


def test_the_cache_grows_through_the_buckets_and_changes_no_token(tiny, monkeypatch):
  config, params = tiny
  config = dataclasses.replace(config, eos_token_id=None)  # always all 40 tokens
  gen = generate.Generator(config, params, None, max_batch_size=4, max_seq_len=128)
  grown = []
  grow = generate._grow_cache
  monkeypatch.setattr(generate, "_grow_cache",
                      lambda size, state: grown.append(size) or grow(size, state))
  prompt = PROMPTS[0]  # 7 tokens: prompt bucket 16, so decoding writes slots 16..55
  out = gen.generate([prompt], generate.SamplingParams(max_new_tokens=40))[0]
  assert grown == [32, 48, 64]  # from bucket(16 + 8) = 24 slots to bucket(16 + 40) = 64
  assert out.token_ids == greedy_reference(config, params, prompt, 40, width=64)


def test_padded_batches_use_one_batch_shape_and_give_the_same_tokens(tiny, generator):
  config, params = tiny
  padded = generate.Generator(config, params, None, max_batch_size=4, max_seq_len=128,
                              pad_batches=True)
  assert padded.buckets(1, 7, 20)[0] == padded.buckets(3, 7, 20)[0] == 4
  assert generator.buckets(1, 7, 20)[0] == 1
  sampling = generate.SamplingParams(max_new_tokens=12)
  assert ([o.token_ids for o in padded.generate(PROMPTS[:1], sampling)]
          == [o.token_ids for o in generator.generate(PROMPTS[:1], sampling)])


def test_padded_batches_keep_one_cache_size(tiny, monkeypatch):
  config, params = tiny
  config = dataclasses.replace(config, eos_token_id=None)
  padded = generate.Generator(config, params, None, max_batch_size=4, max_seq_len=128,
                              pad_batches=True)
  monkeypatch.setattr(generate, "_grow_cache", lambda *a: pytest.fail("the cache grew"))
  out = padded.generate(PROMPTS[:1], generate.SamplingParams(max_new_tokens=40))[0]
  assert out.completion_tokens == 40


def test_a_shared_prefix_is_prefilled_once_and_gives_the_same_tokens(tiny):
  config, params = tiny
  common = [int(x) for x in np.random.default_rng(0).integers(3, 97, 70)]
  prompts = [common + [5, 6, 7], common + [8], common[:66]]  # shared: 65 -> 64 (16s)
  assert generate.shared_prefix_length(prompts) == 64
  assert generate.shared_prefix_length([common + [1], common + [2]]) == 64  # 70 -> 64
  assert generate.shared_prefix_length([common * 2 + [1], common * 2 + [2]]) == 128  # 140
  assert generate.shared_prefix_length([common[:40], common[:40]]) == 0  # too short to share
  assert generate.shared_prefix_length([common, [1] + common[1:]]) == 0  # first token differs
  sampling = generate.SamplingParams(max_new_tokens=20)
  shared = generate.Generator(config, params, None, max_batch_size=4, max_seq_len=128)
  assert shared.buckets(3, 73, 20, 64) == (4, 16, 48)  # rows hold only their tails
  outs = shared.generate(prompts, sampling)
  for prompt, out in zip(prompts, outs):
    assert out.token_ids == greedy_reference(config, params, prompt, 20, width=96)
    assert out.prompt_tokens == len(prompt)
  unshared = generate.Generator(config, params, None, max_batch_size=4, max_seq_len=128,
                                share_prefix=False)
  assert [o.token_ids for o in unshared.generate(prompts, sampling)] == [
      o.token_ids for o in outs]


@pytest.mark.parametrize("n, most, expected", [
    (200, 32, 29), (64, 32, 32), (65, 32, 22), (5, 32, 5), (1, 1, 1), (7, 2, 2)])
def test_balanced_batch_size_uses_the_fewest_batches_about_equally_full(n, most, expected):
  size = generate.balanced_batch_size(n, most)
  assert size == expected and size <= most
  assert -(-n // size) == -(-n // most)  # no more batches than at the largest size


def test_balanced_batch_size_refuses_empty_input():
  with pytest.raises(ValueError, match="n >= 1"):
    generate.balanced_batch_size(0, 8)


def test_more_prompts_than_the_batch_and_per_row_lengths(tiny, generator):
  config, params = tiny
  prompts = [[10 + i, 20 + i, 30 + i] for i in range(6)]  # 6 rows, max_batch_size 4
  sampling = [generate.SamplingParams(max_new_tokens=15 + i) for i in range(6)]
  outs = generator.generate(prompts, sampling)
  for i, (prompt, out) in enumerate(zip(prompts, outs)):
    assert out.token_ids == greedy_reference(config, params, prompt, 15 + i)


def test_greedy_matches_hugging_face_generate_with_left_padding(tmp_path):
  import torch
  import transformers
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
      pad_token_id=0, max_position_embeddings=128)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  model.save_pretrained(tmp_path)
  config, params, _ = pretrained.load_llama(str(tmp_path))
  prompts = [[1, 17, 33, 5, 9, 60, 71], [1, 44, 8], [1, 90, 91, 92, 93]]
  ours = generate.Generator(config, params, None, max_batch_size=4).generate(
      prompts, generate.SamplingParams(max_new_tokens=16))
  t = max(map(len, prompts))
  ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                            do_sample=False, pad_token_id=0)[:, t:].tolist()
  for row, out in zip(theirs, ours):
    expected = row[:row.index(2)] if 2 in row else row
    assert out.token_ids == expected


def test_sample_respects_top_k_top_p_and_temperature():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.vmap(jax.random.key)(jnp.arange(4000))
  sample = jax.jit(generate.sample)
  draw = lambda t, k, p: np.asarray(sample(  # noqa: E731
      logits, keys, jnp.full(4000, t), jnp.full(4000, k, jnp.int32), jnp.full(4000, p)))
  counts = np.bincount(draw(1.0, 0, 1.0), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  assert set(draw(1.0, 2, 1.0)) == {0, 1}
  assert set(draw(1.0, 0, 0.7)) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
  assert set(draw(1.0, 0, 0.4)) == {0}
  assert set(draw(0.0, 0, 1.0)) == {0}
  sharp = np.bincount(draw(0.25, 0, 1.0), minlength=4) / 4000
  assert sharp[0] > 0.8
  # Rows that ask for top-k truncate; rows of the same batch that do not, draw from all.
  mixed_k = jnp.where(jnp.arange(4000) < 2000, 2, 0).astype(jnp.int32)
  mixed = np.asarray(sample(logits, keys, jnp.ones(4000), mixed_k, jnp.ones(4000)))
  assert set(mixed[:2000]) == {0, 1} and set(mixed[2000:]) == {0, 1, 2, 3}


def test_sampling_is_seeded_per_row(generator):
  rows = [generate.SamplingParams(max_new_tokens=20, temperature=1.0, seed=s) for s in (1, 2)]
  a = generator.generate(PROMPTS[:2], rows)
  b = generator.generate(PROMPTS[:2], rows)
  assert [x.token_ids for x in a] == [x.token_ids for x in b]
  other = generator.generate(PROMPTS[:2], [rows[0], generate.SamplingParams(
      max_new_tokens=20, temperature=1.0, seed=3)])
  assert other[0].token_ids == a[0].token_ids  # a row does not depend on its neighbours
  greedy = generator.generate(PROMPTS[:1], generate.SamplingParams(max_new_tokens=20))
  mixed = generator.generate(PROMPTS[:2], [generate.SamplingParams(max_new_tokens=20),
                                           rows[1]])
  assert mixed[0].token_ids == greedy[0].token_ids
  top1 = generator.generate(PROMPTS[:1], generate.SamplingParams(
      max_new_tokens=20, temperature=2.0, top_k=1, seed=9))
  assert top1[0].token_ids == greedy[0].token_ids


def test_lora_collection_changes_generation_like_merged_weights(tiny):
  from slim_jax.models import lora
  config, params = tiny
  spec = lora.LoraSpec(rank=2, alpha=4.0)
  adapter = jax.tree.map(lambda x: x + 0.3, lora.init_lora(params, spec, jax.random.key(1)))
  sampling = generate.SamplingParams(max_new_tokens=20)
  plain = generate.Generator(config, params, None).generate(PROMPTS, sampling)
  adapted = generate.Generator(config, params, None, lora=adapter,
                               lora_scale=spec.scale).generate(PROMPTS, sampling)
  merged = generate.Generator(config, lora.merge(params, adapter, spec.scale), None).generate(
      PROMPTS, sampling)
  assert [x.token_ids for x in adapted] == [x.token_ids for x in merged]
  assert [x.token_ids for x in adapted] != [x.token_ids for x in plain]


def test_prompt_too_long_is_refused(generator):
  with pytest.raises(ValueError, match="max_seq_len=128"):
    generator.generate([[3] * 120], generate.SamplingParams(max_new_tokens=9))


# ------------------------------------------------------------- real tokenizer (SmolLM2)

@pytest.fixture(scope="module")
def chat_generator():
  """A tiny random model with SmolLM2's real tokenizer and chat template."""
  from slim_jax.convert import gguf_llama
  tokenizer = gguf_llama.load_tokenizer(smollm2_gguf())
  config = llama.LlamaConfig.tiny(vocab_size=len(tokenizer), eos_token_id=2, pad_token_id=2,
                                  bos_token_id=1)
  params = nn.unbox(llama.Llama(config).init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32)))
  return generate.Generator(config, params["params"], tokenizer, max_batch_size=4,
                            max_seq_len=256)


MESSAGES = [[{"role": "user", "content": "Which games does a Zelda fan like?"}],
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Hi"}]]


def test_chat_renders_the_template_and_streams_the_final_text(chat_generator):
  g = chat_generator
  rendered = g.render_chat(MESSAGES[0])
  assert rendered == g.tokenizer.apply_chat_template(MESSAGES[0], tokenize=False,
                                                     add_generation_prompt=True)
  assert rendered.endswith("<|im_start|>assistant\n")
  streamed = collections.defaultdict(str)
  outs = g.chat(MESSAGES, generate.SamplingParams(max_new_tokens=24, temperature=0.8, seed=4),
                callback=lambda row, text: streamed.__setitem__(row, streamed[row] + text))
  for row, out in enumerate(outs):
    assert out.text and streamed[row] == out.text
    assert out.text == g.tokenizer.decode(out.token_ids, skip_special_tokens=True,
                                          clean_up_tokenization_spaces=False)
    prompt = g.tokenizer(g.render_chat(MESSAGES[row]), add_special_tokens=False)["input_ids"]
    assert out.prompt_tokens == len(prompt)


def test_streams_reach_the_callers_rows_when_batches_are_sorted_by_length(chat_generator):
  """Conversations of different lengths over several batches: generate() runs them sorted
  by length, and each streamed text still reaches the caller's row number."""
  g = chat_generator
  conversations = [MESSAGES[0], MESSAGES[1], [{"role": "user", "content": "A " * 40}],
                   [{"role": "user", "content": "Why?"}], MESSAGES[0]]
  lengths = [len(g.chat_ids(m)) for m in conversations]
  assert sorted(lengths) != lengths  # the batches are not in the caller's order
  streamed = collections.defaultdict(str)
  sampling = generate.SamplingParams(max_new_tokens=10)
  outs = g.chat(conversations, sampling,
                callback=lambda row, text: streamed.__setitem__(row, streamed[row] + text))
  for row, out in enumerate(outs):
    assert out.prompt_tokens == lengths[row] and streamed[row] == out.text
    alone = g.chat([conversations[row]], sampling)[0]
    assert alone.token_ids == out.token_ids
  assert sum(len(text) for text in streamed.values()) > 0


def test_one_row_shares_no_prefix(tiny, monkeypatch):
  """A lone prompt is not split into a shared prefix (that would compile a program per
  prompt length for nothing)."""
  config, params = tiny
  gen = generate.Generator(config, params, None, max_batch_size=4, max_seq_len=256)
  seen = []
  prefill = generate._prefill
  monkeypatch.setattr(gen, "_prefill", lambda size, v, inputs: seen.append(
      "prefix" in inputs) or prefill(gen.model, gen.eos_ids, gen.pad_id, 1024, size, v, inputs))
  gen.generate([list(range(3, 90))], generate.SamplingParams(max_new_tokens=2))
  gen.generate([list(range(3, 90)), list(range(3, 90)) + [5]],
               generate.SamplingParams(max_new_tokens=2))
  assert seen == [False, True]


def test_stop_strings_cut_the_text_and_the_stream(chat_generator):
  g = chat_generator
  free = g.chat(MESSAGES[:1], generate.SamplingParams(max_new_tokens=24))[0]
  assert len(free.text) > 6
  stop = free.text[3:6]  # a string the greedy continuation is known to contain
  streamed = []
  cut = g.chat(MESSAGES[:1], generate.SamplingParams(max_new_tokens=24, stop=(stop, "@@@")),
               callback=lambda row, text: streamed.append(text))[0]
  assert cut.finish_reason == "stop"
  assert cut.text == free.text[:free.text.find(stop)]
  assert "".join(streamed) == cut.text
  assert cut.token_ids == free.token_ids[:len(cut.token_ids)]
  assert len(cut.token_ids) < len(free.token_ids)


def test_bfloat16_generation_runs_in_bfloat16(tiny):
  config, params = tiny
  g = generate.Generator(config, params, None, max_batch_size=4, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(g.variables)} == {jnp.dtype(jnp.bfloat16)}
  outs = g.generate(PROMPTS, generate.SamplingParams(max_new_tokens=20))
  assert all(0 < o.completion_tokens <= 20 for o in outs)
  assert all(0 <= t < config.vocab_size for o in outs for t in o.token_ids)
