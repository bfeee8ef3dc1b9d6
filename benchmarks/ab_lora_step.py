r"""A/B of one change to the LoRA step: today's step against the step compiled with that
change undone (`--undo`):

  loss       the loss's blocks rematerialised in the backward pass
             (token_loss.chunked_nll(frozen_head=False)) instead of the frozen-head path;
  attention  attention differentiated by autodiff (llama._attend) instead of
             slim_jax/models/attention.py's written-out backward pass.

Both sides are benchmarks/distill.py's bf16 step (SmolLM2-135M, batch 4, rank 8 on q, k, v,
o) in one process. Steps alternate after two warm-up steps each.

  .venv/bin/python benchmarks/ab_lora_step.py --undo=attention --seq 512 --repeats 4
"""

import argparse
import functools
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import distill as bench  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=4)
  parser.add_argument("--undo", choices=("loss", "attention"), required=True)
  args = parser.parse_args()
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  from slim_jax.models import attention, llama  # pylint: disable=import-outside-toplevel
  from slim_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  from slim_jax.train import token_loss  # pylint: disable=import-outside-toplevel

  spec = lora_lib.LoraSpec(rank=8, alpha=16.0, dropout=0.0)
  cfg, params, _ = pretrained.load_llama(bench.gguf_path(), param_dtype="bfloat16")
  batch = bench.make_batch(4, args.seq, cfg.vocab_size)
  sides = {"undone": bench.Ours(cfg, params, batch, spec, "bfloat16"),
           "today": bench.Ours(cfg, params, batch, spec, "bfloat16")}
  if args.undo == "loss":
    module, name = token_loss, "chunked_nll"
    undone = functools.partial(token_loss.chunked_nll, frozen_head=False)
  else:
    module, name = attention, "attend"
    undone = llama._attend  # pylint: disable=protected-access
  today = getattr(module, name)
  setattr(module, name, undone)  # the undone side's step compiles with it
  try:
    print("undone first loss", sides["undone"].step())
  finally:
    setattr(module, name, today)
  print("today first loss", sides["today"].step())
  for side in sides.values():
    side.step()
  times = {name: [] for name in sides}
  for _ in range(args.repeats):
    for name, side in sides.items():
      start = time.perf_counter()
      side.step()
      times[name].append(time.perf_counter() - start)
  for name, t in times.items():
    median = statistics.median(t)
    print(f"{args.undo} {name}: step median {median:.2f} s, steps {[round(x, 2) for x in t]}, "
          f"tokens/s {4 * args.seq / median:.1f}")


if __name__ == "__main__":
  main()
