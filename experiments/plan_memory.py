r"""Prints the per-device memory plan of a LoRA distillation run and whether it fits.

Nothing is allocated: shapes come from jax.eval_shape (slim_jax/memory_plan.py).

  python experiments/plan_memory.py --model=llama2-7b --mesh=data=1,fsdp=8 \
      --batch_size=8 --max_length=1024 --lora_rank=16
  python experiments/plan_memory.py --model=llama2-7b --mesh=fsdp=4 --devices=tpu-v4
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from slim_jax import memory_plan as mp  # noqa: E402
from slim_jax.models import lora  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "llama2-7b", list(mp.PRESETS), "Model shape.")
flags.DEFINE_string("mesh", "data=1,fsdp=8", "data=N,fsdp=M,tensor=K (every size given).")
flags.DEFINE_integer("batch_size", 8, "Global examples per step (per microbatch).")
flags.DEFINE_integer("max_length", 1024, "Tokens per example.")
flags.DEFINE_integer("lora_rank", 16, "LoRA rank.")
flags.DEFINE_list("lora_targets", ["q_proj", "k_proj", "v_proj", "o_proj"], "Adapted modules.")
flags.DEFINE_enum("compute_dtype", "bfloat16", ["float32", "bfloat16"], "Activation dtype.")
flags.DEFINE_enum("param_dtype", "bfloat16", ["float32", "bfloat16"], "Frozen base weights.")
flags.DEFINE_bool("remat", True, "Total with per-layer rematerialisation.")
flags.DEFINE_list("devices", list(mp.DEVICES), f"Devices to check: {list(mp.DEVICES)}.")
flags.DEFINE_bool("json", False, "Print JSON instead of the table.")


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(flags.FLAGS.verbosity)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [d for d in FLAGS.devices if d not in mp.DEVICES]
  if unknown:
    raise app.UsageError(f"--devices: unknown {unknown}; choose from {list(mp.DEVICES)}")
  try:
    p = mp.plan(mp.PRESETS[FLAGS.model],
                lora.LoraSpec(rank=FLAGS.lora_rank, targets=tuple(FLAGS.lora_targets)),
                FLAGS.mesh, FLAGS.batch_size, FLAGS.max_length,
                compute_dtype=FLAGS.compute_dtype, param_dtype=FLAGS.param_dtype,
                remat=FLAGS.remat)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.json:
    print(json.dumps({**p.as_dict(), "fits": {d: p.fits(d) for d in FLAGS.devices}}, indent=2))
    return
  print(f"{FLAGS.model} LoRA r={FLAGS.lora_rank} mesh {FLAGS.mesh}, batch {FLAGS.batch_size} "
        f"x {FLAGS.max_length} tokens, params {FLAGS.param_dtype}, compute "
        f"{FLAGS.compute_dtype}; bytes per device:")
  print(mp.format_plan(p, FLAGS.devices))


if __name__ == "__main__":
  app.run(main)
