"""Distillation: LoRA instruction tuning of the LLaMA student on teacher rationales.

`L_distill = - sum_u sum_t log P(r'_{u,t} | p'_u, r'_{u,<t})` (DESIGN.md, step 2), with the
loss on rationale tokens only (`loss_mask` from slim_jax/data/rationale_examples.py) and
the base weights frozen.

The train state is a small pytree (`TrainState`: step, adapter, optimizer state, RNG);
the frozen base parameters are a separate argument of the step, never donated and never
copied. One jitted `train_step` carries `in_shardings`/`out_shardings` derived from the
logical axis names (`jax.eval_shape` + `nn.get_partition_spec` + slim_jax/sharding.py),
so the same code runs on one device and on a (data, fsdp, tensor) mesh of many. The
data position of a run is its step (`BucketedBatches.batch(step)` is deterministic) and
dropout draws `fold_in(rng, step)`, so a run restored from a checkpoint continues exactly
as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from slim_jax import distributed, sharding
from slim_jax.data import rationale_examples as rx
from slim_jax.models import llama
from slim_jax.models import lora as lora_lib
from slim_jax.train import checkpoints, metrics_log, optim, token_loss

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  # Dropout 0.05 on the adapter input and 20 warmup steps: the usual LoRA fine-tuning recipe.
  lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.05)
  optim: optim.OptimConfig = optim.OptimConfig(warmup_steps=20)
  batch_size: int = 8  # examples per optimizer step (global, over all devices)
  microbatches: int = 1  # gradient accumulation: batch_size / microbatches per pass
  max_length: int = 1024  # prompt + rationale tokens per example; longer ones are cut
  eval_every: int = 50  # held-out NLL every N steps (and at the start and the end)
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0
  mesh: str = ""  # 'data=2,fsdp=2,tensor=2'; empty: every device on data
  compute_dtype: str = "float32"  # or 'bfloat16' (parameters stay float32)
  remat: bool = False  # recompute each layer's activations in the backward pass

  def __post_init__(self):
    for name in ("batch_size", "microbatches", "max_length", "eval_every",
                 "checkpoint_every", "keep_checkpoints", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.batch_size % self.microbatches:
      raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                       f"microbatches={self.microbatches}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")

  @property
  def num_steps(self) -> int:
    return self.optim.total_steps


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer steps done = data position
  lora: Any  # adapter tree {..., "q_proj": {"a": [I, r], "b": [r, F]}}
  opt_state: Any
  rng: jax.Array  # [2] uint32 raw key; dropout uses fold_in(rng, step)


def make_model(model_config: llama.LlamaConfig, config: DistillConfig) -> llama.Llama:
  """The student with the adapter's scale and dropout, compute dtype and remat applied."""
  dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
  model_config = dataclasses.replace(model_config, dtype=dtype, remat=config.remat)
  return llama.Llama(model_config, lora_scale=config.lora.scale,
                     lora_dropout=config.lora.dropout)


def token_nll(model: nn.Module, base: Any, adapter: Any, batch: dict, *,
              dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum of -log P over loss-masked next tokens, number of those tokens).

  The output head is applied chunk by chunk (token_loss.chunked_nll), so the [B, T, V]
  logits never exist; a LoRA adapter on lm_head falls back to the model's full logits.
  """
  rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
  variables = {"params": base, "lora": adapter}
  kw = dict(attention_mask=batch["attention_mask"], deterministic=dropout_rng is None,
            rngs=rngs)
  ids = batch["input_ids"]
  # Position t predicts token t+1; the last position predicts nothing (mask 0).
  targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))  # [B, T]
  mask = jnp.pad(batch["loss_mask"][:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))  # [B, T]
  if "lm_head" in adapter:
    logits = model.apply(variables, ids, **kw)  # [B, T, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    return jnp.sum(nll * mask), jnp.sum(mask)
  hidden = model.apply(variables, ids, return_hidden=True, **kw)  # [B, T, D]
  cfg = model.config
  if cfg.tie_word_embeddings:  # the embedding [V, D] is the head
    head = base["embed_tokens"]["embedding"].T
  else:
    head = base["lm_head"]["kernel"]
  # The head is a base weight, frozen: only the adapter trains.
  return token_loss.chunked_nll(hidden, head, targets, mask, jnp.dtype(cfg.dtype),
                                frozen_head=True)


class Distiller:
  """Builds the sharded state and the jitted train and eval steps for one mesh."""

  def __init__(self, config: DistillConfig, model_config: llama.LlamaConfig,
               base_params: Any, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.model = make_model(model_config, config)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.tx = optim.make_optimizer(config.optim)
    self.schedule = optim.learning_rate_schedule(config.optim)

    dummy = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(
        lambda: self.model.init(jax.random.key(0), dummy))  # boxed: carries logical axes
    param_logical = nn.get_partition_spec(abstract)["params"]
    self.param_shardings = sharding.logical_to_sharding(param_logical, self.mesh)
    self.base = jax.device_put(base_params, self.param_shardings)

    rng = jax.random.PRNGKey(config.seed)
    abstract_lora = jax.eval_shape(
        lambda p: lora_lib.init_lora(p, config.lora, rng), self.base)
    self.lora_shardings = sharding.logical_to_sharding(
        lora_lib.lora_partition_specs(abstract_lora, param_logical), self.mesh)
    replicated = sharding.replicated(self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_lora)
    opt_shardings = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.lora_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    self.state_shardings = TrainState(step=replicated, lora=self.lora_shardings,
                                      opt_state=opt_shardings, rng=replicated)
    self.batch_shardings = {k: sharding.batch_sharding(self.mesh, 2)
                            for k in ("input_ids", "attention_mask", "loss_mask")}

    def init_state(base):
      adapter = lora_lib.init_lora(base, config.lora, jax.random.fold_in(rng, 1))
      return TrainState(step=jnp.zeros((), jnp.int32), lora=adapter,
                        opt_state=self.tx.init(adapter), rng=jax.random.fold_in(rng, 2))

    self._init = jax.jit(init_state, in_shardings=(self.param_shardings,),
                         out_shardings=self.state_shardings)
    self._train_step = jax.jit(
        self._step, in_shardings=(self.state_shardings, self.param_shardings,
                                  self.batch_shardings),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval_step = jax.jit(
        lambda adapter, base, batch: token_nll(self.model, base, adapter, batch),
        in_shardings=(self.lora_shardings, self.param_shardings, self.batch_shardings),
        out_shardings=(replicated, replicated))

  def _step(self, state: TrainState, base: Any, batch: dict) -> tuple[TrainState, dict]:
    dropout = self.config.lora.dropout > 0
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_and_count(adapter, microbatch, index):
      rng = jax.random.fold_in(step_rng, index) if dropout else None
      return token_nll(self.model, base, adapter, microbatch, dropout_rng=rng)

    loss_sum, count, grads = optim.accumulate_gradients(
        loss_and_count, state.lora, batch, self.config.microbatches)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.lora)
    adapter = optax.apply_updates(state.lora, updates)
    metrics = {"train/loss": loss_sum / count, "train/grad_norm": optax.tree.norm(grads),
               "train/lr": self.schedule(state.step), "train/loss_tokens": count}
    return state.replace(step=state.step + 1, lora=adapter, opt_state=opt_state), metrics

  # -- public, each under the mesh and the logical-axis rules --------------------------

  def _context(self):
    return _MeshContext(self.mesh)

  def init_state(self) -> TrainState:
    with self._context():
      return self._init(self.base)

  def abstract_state(self) -> TrainState:
    with self._context():
      shapes = jax.eval_shape(self._init, self.base)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with self._context():
      return self._train_step(state, self.base, self._put(batch))

  def heldout_nll(self, adapter: Any, batches: rx.BucketedBatches) -> float:
    """Mean -log P per rationale token over every held-out example."""
    total, count = 0.0, 0.0
    with self._context():
      for batch in batches.epoch():
        s, c = self._eval_step(adapter, self.base, self._put(batch))
        total += float(s)
        count += float(c)
    return total / max(count, 1.0)

  def _put(self, batch: dict) -> dict:
    # Every process holds the whole host batch and sends only its own rows to its devices.
    return distributed.shard_global_batch({k: batch[k] for k in self.batch_shardings},
                                          self.batch_shardings)


class _MeshContext:
  """`with mesh` plus the logical-axis rules, for activation constraints inside the model."""

  def __init__(self, mesh):
    self.mesh = mesh
    self._rules = None

  def __enter__(self):
    self._rules = nn.logical_axis_rules(sharding.DEFAULT_RULES)
    self._rules.__enter__()
    self._mesh = jax.set_mesh(self.mesh)
    self._mesh.__enter__()
    return self

  def __exit__(self, *exc):
    self._mesh.__exit__(*exc)
    self._rules.__exit__(*exc)
    return False


def fingerprint(config: DistillConfig, examples: Sequence[rx.Example],
                model_config: llama.LlamaConfig) -> str:
  """Hash of what determines a run: config, model shape and the tokenized examples."""
  h = hashlib.sha256()
  h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
  h.update(repr(model_config).encode())
  for ex in examples:
    h.update(ex.input_ids.tobytes())
    h.update(ex.loss_mask.tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class DistillResult:
  final_step: int
  final_loss: float  # training loss of the last step
  initial_heldout_nll: float | None
  final_heldout_nll: float
  losses: dict[int, float]  # step -> training loss, for the steps this process ran
  lora: Any  # the final adapter (host numpy)
  resumed_from: int | None


def train_and_evaluate(config: DistillConfig, model_config: llama.LlamaConfig,
                       base_params: Any, train_examples: Sequence[rx.Example],
                       heldout_examples: Sequence[rx.Example], pad_id: int, workdir: str,
                       *, progress: bool = True, mesh: jax.sharding.Mesh | None = None
                       ) -> DistillResult:
  """Trains (or resumes) in `workdir`: checkpoints/, logs/ (TensorBoard + metrics.jsonl)."""
  os.makedirs(workdir, exist_ok=True)
  boundaries = rx.bucket_boundaries(config.max_length)
  train_batches = rx.BucketedBatches(train_examples, config.batch_size, pad_id, boundaries,
                                     seed=config.seed)
  heldout_batches = rx.BucketedBatches(heldout_examples, config.batch_size, pad_id,
                                       boundaries, shuffle=False)
  distiller = Distiller(config, model_config, base_params, mesh)
  run_id = fingerprint(config, list(train_examples) + list(heldout_examples), model_config)

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                  max_to_keep=config.keep_checkpoints)
  resumed_from = ckpt.latest_step()
  state = None
  if resumed_from is not None:
    state, meta = ckpt.restore(distiller.abstract_state())
    if meta.get("fingerprint") == run_id:
      logging.info("resumed from step %d (epoch %d, batch %d)", resumed_from,
                   meta.get("epoch", -1), meta.get("batch_in_epoch", -1))
    else:  # partial work of another config or data: never resumed
      logging.warning("%s: checkpoints come from another run (config or data differ: %s != "
                      "%s); deleting them and training from the start", ckpt.directory,
                      meta.get("fingerprint"), run_id)
      ckpt.close()
      if distributed.is_main_process():
        shutil.rmtree(ckpt.directory)
      distributed.barrier("distill: stale checkpoints deleted")
      ckpt = checkpoints.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                      max_to_keep=config.keep_checkpoints)
      state, resumed_from = None, None
  if state is None:
    state = distiller.init_state()
  start = int(state.step)

  main = distributed.is_main_process()  # the run's logs are written once, by process 0
  writer = metrics_log.MetricsWriter(os.path.join(workdir, LOG_DIR),
                                     resume_step=resumed_from, enabled=main)
  initial_nll = None
  if resumed_from is not None:  # the interrupted run measured it at step 0
    initial_nll = next((r["eval/heldout_nll"] for r in metrics_log.read_metrics(writer.logdir)
                        if r.get("step") == 0 and "eval/heldout_nll" in r), None)
  else:
    initial_nll = distiller.heldout_nll(state.lora, heldout_batches)
    writer.write(0, {"eval/heldout_nll": initial_nll})
    logging.info("held-out NLL before training: %.4f", initial_nll)
  final_nll = initial_nll

  bar = None
  if progress and main:
    from tqdm import tqdm
    bar = tqdm(total=config.num_steps, initial=start, desc="distill", unit="step",
               dynamic_ncols=True)
  losses: dict[int, float] = {}
  window_tokens, window_start = 0, time.perf_counter()
  pending: list[tuple[int, dict]] = []
  try:
    for step in range(start, config.num_steps):
      batch = train_batches.batch(step)
      state, metrics = distiller.train_step(state, batch)
      window_tokens += int(batch["attention_mask"][batch["loss_mask"].any(1)].sum())
      pending.append((step + 1, metrics))
      done = step + 1
      last = done == config.num_steps
      evaluate = done % config.eval_every == 0 or last
      save = done % config.checkpoint_every == 0 or last
      if done % config.log_every == 0 or evaluate or save:
        fetched = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        tokens_per_s = window_tokens / max(elapsed, 1e-9)
        for s, m in fetched:
          losses[s] = float(m["train/loss"])
          writer.write(s, {**m, "train/tokens_per_s": tokens_per_s})
        pending, window_tokens, window_start = [], 0, time.perf_counter()
        if bar is not None:
          bar.set_postfix(loss=f"{losses[done]:.4f}", tok_s=f"{tokens_per_s:.0f}")
      if evaluate:
        final_nll = distiller.heldout_nll(state.lora, heldout_batches)
        writer.write(done, {"eval/heldout_nll": final_nll})
        if bar is not None:
          bar.write(f"step {done}: held-out NLL {final_nll:.4f}")
      if save:
        epoch, index = divmod(done, train_batches.batches_per_epoch)
        ckpt.save(done, state, metadata={
            "step": done, "epoch": epoch, "batch_in_epoch": index,
            "fingerprint": run_id, "config": dataclasses.asdict(config)})
      if evaluate or save:  # tokens/s counts training time only
        window_start = time.perf_counter()
      if bar is not None:
        bar.update(1)
    if final_nll is None:  # resumed at the very end: nothing ran
      final_nll = distiller.heldout_nll(state.lora, heldout_batches)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
  if not losses:
    done_rows = [r for r in metrics_log.read_metrics(os.path.join(workdir, LOG_DIR))
                 if "train/loss" in r]
    losses = {r["step"]: r["train/loss"] for r in done_rows}
  final_step = int(state.step)
  return DistillResult(final_step=final_step, final_loss=losses.get(final_step, float("nan")),
                       initial_heldout_nll=initial_nll, final_heldout_nll=float(final_nll),
                       losses=losses, lora=distributed.to_host(state.lora),
                       resumed_from=resumed_from)
