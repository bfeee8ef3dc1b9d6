r"""Distillation speed on an accelerator: tokens/s and model FLOP utilisation (MFU).

One prepared script for a machine with a GPU (or TPU): trains the LoRA student
(slim_jax/train/distill.py, rank 16 on q/k/v/o, AdamW) with random bfloat16 base weights
in bfloat16 compute for SmolLM2-135M and a 1B LLaMA shape (slim_jax/memory_plan.py
presets), on every local device (data parallel), then times student generation
(slim_jax/generate.py, bfloat16, batch 64, one device), and writes
docs/results/gpu_benchmark.json. MFU = model FLOPs per step (benchmarks/distill.py's
count: forward plus input gradients, frozen weights need no weight gradients) / time /
the device's dense bfloat16 peak (table below; unknown devices: a measured bf16 matmul).

  python benchmarks/gpu.py                     # on the GPU machine
  python benchmarks/gpu.py --quick --out /tmp/gpu_quick.json   # tiny shapes, any CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distill import step_flops  # noqa: E402  (benchmarks/distill.py)
from slim_jax import generate, io, memory_plan, sharding  # noqa: E402
from slim_jax.models import llama  # noqa: E402
from slim_jax.models import lora as lora_lib  # noqa: E402
from slim_jax.train import distill, optim  # noqa: E402

# Dense bfloat16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12}


def peak_flops() -> tuple[float, str]:
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_BF16.items():
    if name.lower() in kind.lower():
      return peak, f"data sheet ({name})"
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(5))
  return 2 * n**3 / best, "measured bf16 matmul"


def _time(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def random_params(cfg: llama.LlamaConfig):
  """Random weights in the config's param dtype, made on the device."""
  model = llama.Llama(cfg)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))()
  return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params["params"],
                      is_leaf=lambda x: hasattr(x, "value"))


def bench_generation(name: str, cfg: llama.LlamaConfig, batch: int, prompt_len: int,
                     new_tokens: int) -> dict:
  """Completion tokens/s of `batch` rows decoded together (no EOS: every row runs the
  whole `new_tokens`), after a compiling run of the same shapes."""
  cfg = dataclasses.replace(cfg, param_dtype="bfloat16", eos_token_id=None)
  generator = generate.Generator(cfg, random_params(cfg), None, max_batch_size=batch,
                                 max_seq_len=prompt_len + new_tokens + 64,
                                 dtype=jnp.bfloat16, pad_batches=True, share_prefix=False)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
  sampling = generate.SamplingParams(max_new_tokens=new_tokens)
  generator.generate(prompts, sampling)  # compile
  t = time.perf_counter()
  out = generator.generate(prompts, sampling)
  seconds = time.perf_counter() - t
  tokens = sum(c.completion_tokens for c in out)
  return {"model": name, "case": "generate", "batch": batch, "prompt_len": prompt_len,
          "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
          "device_kind": jax.devices()[0].device_kind}


def bench(name: str, cfg: llama.LlamaConfig, batch: int, seq: int, steps: int,
          remat: bool) -> dict:
  cfg = dataclasses.replace(cfg, param_dtype="bfloat16")
  n = jax.local_device_count()
  mesh = sharding.make_mesh(f"data={n}")
  spec = lora_lib.LoraSpec(rank=16, alpha=32.0)
  config = distill.DistillConfig(
      lora=spec, optim=optim.OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10**6),
      batch_size=batch * n, max_length=seq, compute_dtype="bfloat16", remat=remat)
  params = random_params(cfg)
  d = distill.Distiller(config, cfg, params, mesh=mesh)
  del params
  rng = np.random.default_rng(0)
  data = {"input_ids": rng.integers(3, cfg.vocab_size, (batch * n, seq)).astype(np.int32),
          "attention_mask": np.ones((batch * n, seq), np.int32),
          "loss_mask": np.ones((batch * n, seq), np.int32)}
  state = d.init_state()
  for _ in range(2):  # compile + warm-up
    state, m = d.train_step(state, data)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = d.train_step(state, data)
  jax.block_until_ready((state, m))
  seconds = (time.perf_counter() - t) / steps
  peak, source = peak_flops()
  flops = step_flops(cfg, batch * n, seq)
  stats = jax.devices()[0].memory_stats() or {}
  return {"model": name, "case": "distill", "devices": n,
          "device_kind": jax.devices()[0].device_kind,
          "batch_per_device": batch, "seq_len": seq, "remat": remat,
          "seconds_per_step": seconds, "tokens_per_s": batch * n * seq / seconds,
          "tflops_per_s_per_device": flops / seconds / n / 1e12,
          "mfu": flops / seconds / n / peak, "peak_tflops": peak / 1e12, "peak_source": source,
          "final_loss": float(m["train/loss"]),
          "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes, runs on a CPU")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                    "results", "gpu_benchmark.json"))
  args = parser.parse_args(argv)
  if args.quick:
    runs = [("tiny-llama-remat", llama.LlamaConfig.tiny(), 2, 64, True)]
    steps = min(args.steps, 3)
    generation = [("tiny-llama", llama.LlamaConfig.tiny(), 4, 16, 8)]
  else:
    runs = [("smollm2-135m", memory_plan.PRESETS["smollm2-135m"], 16, 1024, False),
            ("llama-1b", memory_plan.PRESETS["llama-1b"], 8, 1024, True)]
    steps = args.steps
    generation = [("smollm2-135m", memory_plan.PRESETS["smollm2-135m"], 64, 256, 96),
                  ("llama-1b", memory_plan.PRESETS["llama-1b"], 64, 256, 96)]
  rows = []
  for name, cfg, batch, seq, remat in runs:
    row = bench(name, cfg, batch, seq, steps, remat)
    print(f"{name}: {row['tokens_per_s']:.0f} tokens/s, {row['tflops_per_s_per_device']:.1f} "
          f"TFLOP/s per device, MFU {100 * row['mfu']:.1f}% ({row['device_kind']})", flush=True)
    rows.append(row)
  for name, cfg, batch, prompt_len, new_tokens in generation:
    row = bench_generation(name, cfg, batch, prompt_len, new_tokens)
    print(f"{name}: generation at batch {batch}: {row['tokens_per_s']:.0f} tokens/s",
          flush=True)
    rows.append(row)
  io.write_json(args.out, {"jax": jax.__version__, "backend": jax.default_backend(),
                           "quick": args.quick, "rows": rows})
  print("wrote", os.path.abspath(args.out))


if __name__ == "__main__":
  main()
