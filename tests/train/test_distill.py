"""Distillation training: NLL goes down, accumulation is exact, bf16/remat run, real model."""

import os
import time

import jax
import numpy as np
import pytest

import distill_fixtures as fx
from slim_jax.data import rationale_examples as rx
from slim_jax.models import lora
from slim_jax.train import distill, metrics_log, optim


def _config(**kw):
  base = dict(
      lora=lora.LoraSpec(rank=8, alpha=16.0, targets=lora.ATTENTION_TARGETS + lora.MLP_TARGETS),
      optim=optim.OptimConfig(learning_rate=3e-3, warmup_steps=3, total_steps=24),
      batch_size=8, max_length=384, eval_every=12, checkpoint_every=12, log_every=4,
      mesh="data=1")
  base.update(kw)
  return distill.DistillConfig(**base)


def _one_device():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                           ("data", "fsdp", "tensor"))


def test_tiny_training_lowers_heldout_nll_and_logs(tmp_path):
  cfg, params, examples = fx.tiny_setup(num=48)
  train, heldout = rx.split_heldout(examples, 0.25, seed=0)
  result = distill.train_and_evaluate(_config(), cfg, params, train, heldout, 0,
                                      str(tmp_path), progress=False, mesh=_one_device())
  print(f"held-out NLL {result.initial_heldout_nll:.4f} -> {result.final_heldout_nll:.4f}")
  assert result.final_step == 24
  assert result.final_heldout_nll < result.initial_heldout_nll - 0.3
  rows = metrics_log.read_metrics(str(tmp_path / distill.LOG_DIR))
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 25))
  for key in ("train/tokens_per_s", "train/grad_norm"):
    assert all(np.isfinite(r[key]) and r[key] > 0 for r in train_rows), key
  evals = [(r["step"], r["eval/heldout_nll"]) for r in rows if "eval/heldout_nll" in r]
  assert [s for s, _ in evals] == [0, 12, 24]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / distill.LOG_DIR))
  # lr follows warmup then cosine decay
  lrs = [r["train/lr"] for r in train_rows]
  assert lrs[0] == 0.0 and max(lrs) == pytest.approx(3e-3) and lrs[-1] < lrs[5]
  # Only the adapter is trained: same tree structure as a fresh adapter.
  fresh = lora.init_lora(params, _config().lora, jax.random.key(0))
  assert jax.tree.structure(result.lora) == jax.tree.structure(fresh)


def test_accumulation_matches_one_pass():
  cfg, params, examples = fx.tiny_setup(num=16)
  batches = rx.BucketedBatches(examples, 8, 0, rx.bucket_boundaries(384), seed=0)
  runs = []
  for micro in (1, 4):
    d = distill.Distiller(_config(microbatches=micro), cfg, params, mesh=_one_device())
    state = d.init_state()
    losses = []
    for step in range(3):
      state, m = d.train_step(state, batches.batch(step))
      losses.append(float(m["train/loss"]))
    runs.append((losses, jax.device_get(state.lora)))
  for losses, adapter in runs[1:]:
    np.testing.assert_allclose(losses, runs[0][0], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), adapter, runs[0][1])


def test_bfloat16_remat_and_dropout_train():
  cfg, params, examples = fx.tiny_setup(num=8)
  batch = rx.BucketedBatches(examples, 8, 0, rx.bucket_boundaries(384), seed=0).batch(0)
  ref = distill.Distiller(_config(), cfg, params, mesh=_one_device())
  loss_ref = float(ref.train_step(ref.init_state(), batch)[1]["train/loss"])
  d = distill.Distiller(_config(compute_dtype="bfloat16", remat=True,
                                lora=lora.LoraSpec(rank=4, dropout=0.1)),
                        cfg, params, mesh=_one_device())
  state = d.init_state()
  state, m1 = d.train_step(state, batch)
  state, m2 = d.train_step(state, batch)
  assert abs(float(m1["train/loss"]) - loss_ref) < 0.05 * loss_ref
  assert np.isfinite(float(m2["train/loss"])) and float(m2["train/grad_norm"]) > 0


@pytest.mark.slow
def test_smollm2_distillation_lowers_heldout_nll(tmp_path):
  """SmolLM2-135M-Instruct, a few hundred fixture pairs: held-out NLL drops clearly."""
  from slim_jax.convert import pretrained
  cfg, params, tok = pretrained.load_llama(fx.gguf_path())
  records = rx.read_teacher_jsonl(fx.FIXTURE)[:240]
  examples, report = rx.build_examples(records, tok, max_length=384)
  assert report.examples_kept == 240, report.summary()
  train, heldout = rx.split_heldout(examples, 40 / 240, seed=0)
  config = distill.DistillConfig(
      lora=lora.LoraSpec(rank=8, alpha=16.0),
      optim=optim.OptimConfig(learning_rate=1e-3, warmup_steps=2, total_steps=25),
      batch_size=8, max_length=384, eval_every=25, checkpoint_every=25, log_every=5,
      mesh="data=1")
  start = time.time()
  result = distill.train_and_evaluate(config, cfg, params, train, heldout,
                                      tok.pad_token_id, str(tmp_path), progress=False,
                                      mesh=_one_device())
  print(f"SmolLM2-135M held-out NLL per rationale token: {result.initial_heldout_nll:.4f} -> "
        f"{result.final_heldout_nll:.4f} ({len(train)} train / {len(heldout)} held-out, "
        f"25 steps of 8, {time.time() - start:.0f}s)")
  assert result.final_heldout_nll < 0.7 * result.initial_heldout_nll
