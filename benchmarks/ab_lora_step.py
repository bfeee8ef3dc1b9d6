r"""A/B of changes to the LoRA step: today's step against the step compiled with the changes
named by `--undo` (comma-separated) undone:

  loss         the loss's blocks rematerialised in the backward pass
               (token_loss.chunked_nll(frozen_head=False)) instead of the frozen-head path;
  attention    attention differentiated by autodiff (llama._attend per query chunk) instead
               of slim_jax/models/attention.py's written-out backward pass;
  chunk_vjp    the written-out backward pass per query chunk, the chunks sliced and joined
               outside it (autodiff pads each chunk's dQ), instead of one VJP for all chunks;
  rope_vjp     RoPE differentiated by autodiff instead of llama.apply_rope's custom VJP;
  rope_table   RoPE's cosine and sine computed in the graph (where XLA fuses them into every
               rotation) instead of read from llama.rope_cos_sin's host table.

Both sides are benchmarks/distill.py's bf16 step (SmolLM2-135M, batch 4, rank 8 on q, k, v,
o) in one process. Steps alternate after two warm-up steps each.

  .venv/bin/python benchmarks/ab_lora_step.py --undo=rope_table,rope_vjp --seq 512 --repeats 4
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

UNDOS = ("loss", "attention", "chunk_vjp", "rope_vjp", "rope_table")


def _per_chunk(attend_one):
  """attention.attend's signature, calling `attend_one(q, key, value, allowed)` per query
  chunk on slices joined outside it, as llama.Attention did before one VJP covered them."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def attend(q, key, value, allowed, chunk):
    t = q.shape[3]
    outs = [attend_one(q[:, :, :, lo:lo + chunk], key[:, :, :lo + chunk],
                       value[:, :, :lo + chunk], allowed[:, lo:lo + chunk, :lo + chunk])
            for lo in range(0, t, chunk)]
    return jnp.concatenate(outs, axis=3)
  return attend


def _rope_in_graph(config, positions, table_size):
  """llama.rope_cos_sin as it was before its host table: cos and sin computed in the graph."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from slim_jax.models import llama  # pylint: disable=import-outside-toplevel
  del table_size
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(llama.rope_inv_freq(config))
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
  return jnp.cos(angles), jnp.sin(angles)


def _undone(name):
  """(module, attribute, the undone replacement) for one --undo name."""
  # pylint: disable=import-outside-toplevel,protected-access
  from slim_jax.models import attention, llama
  from slim_jax.train import token_loss
  if name == "loss":
    return token_loss, "chunked_nll", functools.partial(token_loss.chunked_nll,
                                                        frozen_head=False)
  if name == "attention":
    return attention, "attend", _per_chunk(llama._attend)
  if name == "chunk_vjp":
    today = attention.attend
    return attention, "attend", _per_chunk(lambda q, k, v, a: today(q, k, v, a, q.shape[3]))
  if name == "rope_vjp":
    return llama, "apply_rope", llama._rotate
  return llama, "rope_cos_sin", _rope_in_graph


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=4)
  parser.add_argument("--undo", required=True, help="comma-separated: " + ", ".join(UNDOS))
  args = parser.parse_args()
  undos = args.undo.split(",")
  unknown = sorted(set(undos) - set(UNDOS))
  if unknown:
    parser.error(f"--undo: unknown {unknown}; choose from {', '.join(UNDOS)}")
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  from slim_jax.models import lora as lora_lib  # pylint: disable=import-outside-toplevel

  spec = lora_lib.LoraSpec(rank=8, alpha=16.0, dropout=0.0)
  cfg, params, _ = pretrained.load_llama(bench.gguf_path(), param_dtype="bfloat16")
  batch = bench.make_batch(4, args.seq, cfg.vocab_size)
  sides = {"undone": bench.Ours(cfg, params, batch, spec, "bfloat16"),
           "today": bench.Ours(cfg, params, batch, spec, "bfloat16")}
  patches = [_undone(name) for name in undos]
  todays = [getattr(module, attr) for module, attr, _ in patches]
  for module, attr, undone in patches:
    setattr(module, attr, undone)  # the undone side's step compiles with them
  try:
    print("undone first loss", sides["undone"].step())
  finally:
    for (module, attr, _), today in zip(patches, todays):
      setattr(module, attr, today)
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
