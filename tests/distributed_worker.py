"""One process of tests/test_distributed.py: distillation and recommender steps on a mesh.

  python tests/distributed_worker.py OUT_JSON CKPT_DIR MODE [COORD NUM_PROCESSES PROCESS_ID]

MODE 'train': joins the job (when COORD is given), runs STEPS distillation steps on a tiny
LLaMA and STEPS SASRec train steps over a data=2,fsdp=2 mesh of every device, each process
feeding only its rows of each global batch; saves the distillation state with orbax into
CKPT_DIR (all processes together) and writes losses and the adapter to OUT_JSON (process
0). Then it distils to the end with `distill.train_and_evaluate` on a data=1,fsdp=4 mesh
(the base weights sharded across the processes) in CKPT_DIR + "_run", and process 0
exports the PEFT adapter to CKPT_DIR + "_peft". MODE 'restore': one process restores
CKPT_DIR and writes the restored adapter.
The device count comes from XLA_FLAGS, set by the test.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slim_jax import distributed  # noqa: E402  (before any device is touched)

STEPS = 3
MESH = "data=2,fsdp=2"
FSDP_MESH = "data=1,fsdp=4"  # fsdp spans both processes of the two-process job
RUN_STEPS = 4
B, T = 8, 24  # distillation batch
RB, RL, ITEMS = 16, 10, 40  # recommender batch, length, items


def distill_batches():
  import numpy as np
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    ids = rng.integers(3, 64, size=(B, T)).astype(np.int32)
    lengths = rng.integers(T // 2, T + 1, size=B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = mask * (np.arange(T)[None] >= 6)
    out.append({"input_ids": ids * mask, "attention_mask": mask,
                "loss_mask": loss_mask.astype(np.int32)})
  return out


def recommender_batches():
  import numpy as np
  rng = np.random.default_rng(1)
  out = []
  for _ in range(STEPS):
    inputs = rng.integers(1, ITEMS + 1, size=(RB, RL)).astype(np.int32)
    inputs[:, :3] = 0  # left padding
    targets = np.roll(inputs, -1, axis=1)
    targets[:, -1] = rng.integers(1, ITEMS + 1, size=RB)
    targets[inputs == 0] = 0
    real = inputs != 0
    out.append({"inputs": inputs, "targets": targets,
                "negatives": rng.integers(1, ITEMS + 1, size=(RB, RL)).astype(np.int32),
                "lengths": np.where(real, np.cumsum(real, axis=1), 0).astype(np.int32),
                "users": np.arange(RB, dtype=np.int32)})
  return out


def distiller():
  import jax
  import numpy as np
  from flax import linen as nn
  from slim_jax import sharding
  from slim_jax.models import llama, lora
  from slim_jax.train import distill, optim
  cfg = llama.LlamaConfig.tiny(vocab_size=64)
  params = nn.unbox(llama.Llama(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32)))
  params = jax.tree.map(np.asarray, params["params"])  # identical host copy on every process
  config = distill.DistillConfig(
      lora=lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1,
                         targets=lora.ATTENTION_TARGETS + lora.MLP_TARGETS),
      optim=optim.OptimConfig(learning_rate=5e-3, warmup_steps=1, total_steps=10),
      batch_size=B, microbatches=2, max_length=T)
  return distill.Distiller(config, cfg, params, mesh=sharding.make_mesh(MESH))


def train(out_path: str, ckpt_dir: str) -> None:
  import jax
  import optax
  import jax.numpy as jnp
  from slim_jax import sharding
  from slim_jax.recommenders import registry
  from slim_jax.train import checkpoints, state as state_lib, steps

  d = distiller()
  state = d.init_state()
  distill_losses = []
  for batch in distill_batches():
    batch = distributed.shard_global_batch(batch, d.batch_shardings)
    state, metrics = d.train_step(state, batch)
    distill_losses.append(float(metrics["train/loss"]))
  ckpt = checkpoints.Checkpointer(ckpt_dir, max_to_keep=1)
  ckpt.save(STEPS, state, metadata={"step": STEPS})
  ckpt.close()  # waits for the (asynchronous) save of every process

  mesh = sharding.make_mesh(MESH)
  model = registry.make_recommender("sasrec", num_items=ITEMS, max_len=RL, hidden_size=16)
  tx = optax.adam(1e-2)
  example = lambda: (jnp.zeros((RB, RL), jnp.int32), jnp.zeros((RB,), jnp.int32))
  rstate, shardings = state_lib.create_train_state(model, tx, example, jax.random.PRNGKey(0),
                                                   mesh)
  train_step = steps.make_train_step(model, tx, "bce", mesh, shardings)
  batch_shardings = steps.batch_shardings(mesh)
  rec_losses = []
  for batch in recommender_batches():
    rstate, m = train_step(rstate, distributed.shard_global_batch(batch, batch_shardings),
                           jax.random.PRNGKey(1))
    rec_losses.append(float(m["loss"]))

  lora_host = distributed.to_host(state.lora)
  if distributed.is_main_process():
    with open(out_path, "w") as f:
      json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                 "local_devices": jax.local_device_count(),
                 "distill_losses": distill_losses, "recommender_losses": rec_losses,
                 "lora": jax.tree.map(lambda x: x.tolist(), lora_host)}, f)


def distill_to_the_end(run_dir: str, peft_dir: str) -> None:
  """The whole training path: batches, steps, held-out NLL, checkpoints, logs, export."""
  import jax
  import numpy as np
  from flax import linen as nn
  from slim_jax import sharding
  from slim_jax.data import rationale_examples as rx
  from slim_jax.models import llama, lora
  from slim_jax.train import distill, optim
  cfg = llama.LlamaConfig.tiny(vocab_size=64)
  params = nn.unbox(llama.Llama(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32)))
  params = jax.tree.map(np.asarray, params["params"])
  rng = np.random.default_rng(2)
  examples = [rx.Example(user_id=i, input_ids=rng.integers(3, 64, size=n).astype(np.int32),
                         loss_mask=np.arange(n) >= 6)
              for i, n in enumerate(rng.integers(12, T + 1, size=20))]
  spec = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1)
  config = distill.DistillConfig(
      lora=spec, optim=optim.OptimConfig(learning_rate=5e-3, warmup_steps=1,
                                         total_steps=RUN_STEPS),
      batch_size=B, max_length=T, eval_every=2, checkpoint_every=2, log_every=1)
  result = distill.train_and_evaluate(config, cfg, params, examples[:16], examples[16:], 0,
                                      run_dir, progress=True,
                                      mesh=sharding.make_mesh(FSDP_MESH))
  if distributed.is_main_process():
    lora.save_peft(peft_dir, result.lora, spec)


def restore(out_path: str, ckpt_dir: str) -> None:
  import jax
  from slim_jax.train import checkpoints
  d = distiller()
  ckpt = checkpoints.Checkpointer(ckpt_dir, max_to_keep=1)
  state, meta = ckpt.restore(d.abstract_state())
  ckpt.close()
  with open(out_path, "w") as f:
    json.dump({"step": int(state.step), "meta": meta,
               "lora": jax.tree.map(lambda x: jax.device_get(x).tolist(), state.lora)}, f)


def main(argv):
  out_path, ckpt_dir, mode = argv[1:4]
  if len(argv) > 4:
    distributed.initialize(argv[4], int(argv[5]), int(argv[6]))
  if mode == "train":
    train(out_path, ckpt_dir)
    distill_to_the_end(ckpt_dir + "_run", ckpt_dir + "_peft")
  else:
    restore(out_path, ckpt_dir)


if __name__ == "__main__":
  main(sys.argv)
