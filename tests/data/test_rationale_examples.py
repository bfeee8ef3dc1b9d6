"""Distillation examples: chat template, rationale-only loss mask, truncation, buckets."""

import json
import os

import numpy as np
import pytest

from slim_jax import assets
from slim_jax.data import rationale_examples as rx

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "rationales_fixture.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
  from slim_jax.convert import gguf_llama
  return gguf_llama.load_tokenizer(assets.smollm2_gguf())


@pytest.fixture(scope="module")
def records():
  return rx.read_teacher_jsonl(FIXTURE)[:24]


def test_loss_mask_covers_exactly_the_assistant_turn(tokenizer, records):
  examples, report = rx.build_examples(records, tokenizer, max_length=1024)
  assert report.examples_kept == len(records) == len(examples)
  assert report.examples_truncated == 0 and not report.examples_dropped
  for record, ex in zip(records, examples):
    prompt = tokenizer.apply_chat_template(record["messages"], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        record["messages"] + [{"role": "assistant", "content": record["response"]}],
        tokenize=False)
    assert tokenizer.decode(ex.input_ids) == full
    n_prompt = int(np.argmax(ex.loss_mask))
    assert not ex.loss_mask[:n_prompt].any() and ex.loss_mask[n_prompt:].all()
    assert tokenizer.decode(ex.input_ids[:n_prompt]) == prompt
    rationale = tokenizer.decode(ex.input_ids[ex.loss_mask])
    assert rationale.startswith(record["response"]) and "<|im_end|>" in rationale
  assert report.rationale_tokens_kept == sum(ex.num_rationale_tokens for ex in examples)


def test_truncation_cuts_rationale_end_and_drops_long_prompts(tokenizer, records):
  full, _ = rx.build_examples(records, tokenizer, max_length=1024)
  lengths = np.array([len(e.input_ids) for e in full])
  prompts = np.array([len(e.input_ids) - e.num_rationale_tokens for e in full])
  max_length = int(np.median(lengths))
  examples, report = rx.build_examples(records, tokenizer, max_length=max_length,
                                       min_rationale_tokens=8)
  too_long_prompt = int(np.sum(prompts + 8 > max_length))
  cut = (lengths > max_length) & (prompts + 8 <= max_length)
  assert report.examples_dropped.get("prompt_too_long", 0) == too_long_prompt
  assert report.examples_truncated == int(cut.sum())
  assert report.rationale_tokens_cut == int(np.sum(lengths[cut] - max_length))
  assert report.examples_kept == len(examples) == len(records) - too_long_prompt
  assert report.longest_example == lengths.max()
  assert all(len(e.input_ids) <= max_length for e in examples)
  assert f"max_length={lengths.max()} would keep everything" in report.summary()
  json.dumps(report.to_dict())

  empty = [dict(records[0], response="  ")]
  examples, report = rx.build_examples(empty, tokenizer, max_length=512)
  assert not examples and report.examples_dropped == {"empty_response": 1}


def test_rationales_cut_by_max_tokens_are_dropped_unless_kept(tokenizer, records):
  marked = [dict(r, finish_reason="length") if i % 3 == 0 else r
            for i, r in enumerate(records)]
  examples, report = rx.build_examples(marked, tokenizer, max_length=1024)
  cut = sum(i % 3 == 0 for i in range(len(records)))
  assert report.examples_dropped == {"cut_by_max_tokens": cut}
  assert len(examples) == len(records) - cut
  kept, report = rx.build_examples(marked, tokenizer, max_length=1024, keep_cut=True)
  assert len(kept) == len(records) and not report.examples_dropped


def test_buckets_pad_and_are_deterministic_per_step(tokenizer, records):
  examples, _ = rx.build_examples(records, tokenizer, max_length=512)
  boundaries = rx.bucket_boundaries(512, smallest=64)
  assert boundaries == (64, 128, 256, 512)
  batches = rx.BucketedBatches(examples, batch_size=5, pad_id=2, boundaries=boundaries, seed=3)
  again = rx.BucketedBatches(examples, batch_size=5, pad_id=2, boundaries=boundaries, seed=3)
  n = batches.batches_per_epoch
  seen = []
  for step in range(n):
    b = batches.batch(step)
    np.testing.assert_array_equal(b["input_ids"], again.batch(step)["input_ids"])
    assert b["input_ids"].shape[0] == 5 and b["input_ids"].shape[1] in boundaries
    real = b["attention_mask"].sum(1)
    assert np.all(b["loss_mask"] <= b["attention_mask"])
    for row in range(5):
      if b["loss_mask"][row].any():
        seen.append(tuple(b["input_ids"][row, :real[row]]))
        assert np.all(b["input_ids"][row, real[row]:] == 2)
  assert sorted(seen) == sorted(tuple(e.input_ids) for e in examples)  # each exactly once
  # The next epoch is another order of the same examples.
  assert any(not np.array_equal(batches.batch(s)["input_ids"], batches.batch(n + s)["input_ids"])
             for s in range(n))


def test_split_heldout_is_disjoint_and_seeded(tokenizer, records):
  examples, _ = rx.build_examples(records[:10], tokenizer, max_length=1024)
  train, held = rx.split_heldout(examples, 0.2, seed=1)
  assert len(held) == 2 and len(train) == 8
  assert {e.user_id for e in train}.isdisjoint({e.user_id for e in held})
  assert [e.user_id for e in held] == [e.user_id for e in rx.split_heldout(examples, 0.2, 1)[1]]


def test_the_held_out_split_does_not_depend_on_the_teacher_file_order(tmp_path, tokenizer):
  """The teacher stage appends records as its requests finish, so two runs write the same
  records in other orders; distillation must hold out the same users either way."""
  lines = open(FIXTURE).readlines()[:12]
  splits = []
  for seed in (0, 1):
    shuffled = [lines[i] for i in np.random.default_rng(seed).permutation(len(lines))]
    path = tmp_path / f"teacher_{seed}.jsonl"
    path.write_text("".join(shuffled))
    examples, _ = rx.build_examples(rx.read_teacher_jsonl(str(path)), tokenizer, 1024)
    splits.append([[e.user_id for e in part] for part in rx.split_heldout(examples, 0.25)])
  assert splits[0] == splits[1]


def test_malformed_teacher_file_names_the_line(tmp_path):
  path = tmp_path / "teacher.jsonl"
  path.write_text(open(FIXTURE).readline() + "{not json\n" + open(FIXTURE).readline())
  with pytest.raises(ValueError, match="teacher.jsonl:2"):
    rx.read_teacher_jsonl(str(path))
  with pytest.raises(FileNotFoundError, match="teacher stage"):
    rx.read_teacher_jsonl(str(tmp_path / "missing.jsonl"))
