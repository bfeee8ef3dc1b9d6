r"""A/B of the LoRA step's loss: the frozen-head path (the hidden states' gradient computed
in the forward pass, slim_jax/train/token_loss.py) against the rematerialised blocks.

Both sides are benchmarks/distill.py's bf16 step (SmolLM2-135M, batch 4, rank 8 on q, k, v,
o) in one process; the old side is compiled with chunked_nll(frozen_head=False). Steps
alternate after two warm-up steps each.

  .venv/bin/python benchmarks/ab_frozen_head_loss.py --seq 512 --repeats 4
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
  args = parser.parse_args()
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  from slim_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel
  from slim_jax.train import token_loss  # pylint: disable=import-outside-toplevel

  spec = lora_lib.LoraSpec(rank=8, alpha=16.0, dropout=0.0)
  cfg, params, _ = pretrained.load_llama(bench.gguf_path(), param_dtype="bfloat16")
  batch = bench.make_batch(4, args.seq, cfg.vocab_size)
  sides = {"rematerialised": bench.Ours(cfg, params, batch, spec, "bfloat16"),
           "frozen head": bench.Ours(cfg, params, batch, spec, "bfloat16")}
  new_nll = token_loss.chunked_nll
  token_loss.chunked_nll = functools.partial(new_nll, frozen_head=False)
  try:
    print("rematerialised first loss", sides["rematerialised"].step())
  finally:
    token_loss.chunked_nll = new_nll
  print("frozen head first loss", sides["frozen head"].step())
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
    print(f"{name}: step median {median:.2f} s, steps {[round(x, 2) for x in t]}, "
          f"tokens/s {4 * args.seq / median:.1f}")


if __name__ == "__main__":
  main()
