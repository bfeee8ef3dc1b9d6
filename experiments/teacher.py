r"""Teacher stage: chain-of-thought rationales r'_u for a seeded subset U' of users.

Sends the three-step prompt (slim_jax/teacher/prompts.py) for each user in U' to any
OpenAI-compatible endpoint and appends the answers to <workdir>/rationales/teacher.jsonl,
one fsynced line per user. A rerun asks only for the users not yet in the file.

  # OpenAI (the key comes from OPENAI_API_KEY and is never written anywhere)
  python experiments/teacher.py --dataset=ml-100k --workdir=/tmp/run \
      --num_users=500 --teacher_model=gpt-3.5-turbo --price=0.5,1.5
  # the project's own server (python -m slim_jax.serve --model=PATH --port=8000)
  python experiments/teacher.py --dataset=ml-100k --workdir=/tmp/run \
      --teacher_base_url=http://127.0.0.1:8000/v1 --teacher_model=SmolLM2-135M-Instruct
  # look at a prompt and its token counts without calling anything
  python experiments/teacher.py --dataset=ml-100k --workdir=/tmp/run --dry_run
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys

from absl import app, flags, logging
import numpy as np

from slim_jax.data.dataset import SequenceDataset
from slim_jax import io
from slim_jax.pipeline.layout import RunLayout
from slim_jax.teacher import client, prompts, rationales

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "ml-100k", "Dataset name, as experiments/prepare_data.py takes it.")
flags.DEFINE_string("data_dir", None, "Raw data folder (Amazon files); unused for ml-100k and "
                    "synthetic.")
flags.DEFINE_string("workdir", None, "Run folder: holds the prepared data and rationales/.")
flags.DEFINE_integer("num_users", 0, "Size of the user subset U' (seeded); 0: every user.")
flags.DEFINE_integer("seed", 0, "Seed for choosing U' and for the endpoint's sampling.")
flags.DEFINE_integer("max_history", prompts.DEFAULT_MAX_HISTORY,
                     "Most recent training-prefix items shown in a prompt.")
flags.DEFINE_string("template", None, "Prompt template file: the user message with a "
                    "{history} placeholder (optionally {num_items}); a line '---' splits off a "
                    "system message above it. Default: the built-in three-step prompt.")
flags.DEFINE_string("teacher_base_url", None, "OpenAI-compatible base URL, e.g. "
                    "http://127.0.0.1:8000/v1; default: OpenAI.")
flags.DEFINE_string("teacher_model", "gpt-3.5-turbo", "Model name sent to the endpoint.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("max_tokens", 512, "Most tokens in one rationale.")
flags.DEFINE_integer("concurrency", 8, "Requests in flight at once.")
flags.DEFINE_float("timeout", 120.0, "Seconds before a request counts as timed out.")
flags.DEFINE_integer("max_retries", 8, "Retries per user on 429/5xx/timeouts/drops.")
flags.DEFINE_float("backoff_initial", 1.0, "First retry wait in seconds (doubles, jittered).")
flags.DEFINE_float("backoff_max", 60.0, "Longest backoff wait in seconds.")
flags.DEFINE_string("price", "0,0", "USD per million tokens, 'INPUT,OUTPUT' (or one number for "
                    "both), for the cost estimate.")
flags.DEFINE_bool("dry_run", False, "Print a sample prompt and token counts; call nothing.")
flags.DEFINE_string("tokenizer", None, "Tokenizer for --dry_run counts: a Hugging Face folder "
                    "or a .gguf file. Default: an estimate of 4 characters per token.")

API_KEY_ENV = "OPENAI_API_KEY"


def hold_lock(path: str):
  """An exclusive lock on the run's rationale file: two runs must not ask for the same users."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle = open(path, "w")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    sys.exit(f"another teacher run holds {path}; wait for it to finish or stop it first")
  return handle


def parse_price(text: str) -> tuple[float, float]:
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) not in (1, 2) or any(v < 0 for v in values):
    raise app.UsageError(f"--price={text!r}: give 'INPUT,OUTPUT' USD per million tokens, e.g. "
                         "--price=0.5,1.5, or one number for both")
  return (values[0], values[-1])


def choose_users(num_users_total: int, num_users: int, seed: int) -> list[int]:
  """The subset U': `num_users` dense ids drawn without replacement, sorted; all when 0."""
  if num_users < 0:
    raise app.UsageError(f"--num_users must be >= 0, got {num_users}")
  if num_users == 0 or num_users >= num_users_total:
    return list(range(num_users_total))
  rng = np.random.default_rng(seed)
  return sorted(int(u) for u in rng.choice(num_users_total, size=num_users, replace=False))


def load_dataset() -> SequenceDataset:
  from slim_jax.data import prepare  # pylint: disable=import-outside-toplevel
  return prepare.prepare_or_load(FLAGS.dataset, FLAGS.data_dir, FLAGS.workdir)


def build_requests(dataset: SequenceDataset, users: list[int],
                   template: prompts.PromptTemplate) -> list[tuple[int, list[dict]]]:
  return [(u, prompts.build_messages(dataset, u, template=template,
                                     max_history=FLAGS.max_history)) for u in users]


def manifest(config: client.ClientConfig, template: prompts.PromptTemplate) -> dict:
  """What the lines in teacher.jsonl depend on besides the prompts themselves.

  The endpoint's address is left out on purpose: a resumed run may reach the same model
  elsewhere (a restarted local server picks another port).
  """
  return {
      "model": config.model, "temperature": config.temperature,
      "top_p": config.top_p, "max_tokens": config.max_tokens, "seed": config.seed,
      "max_history": FLAGS.max_history,
      "template_sha256": hashlib.sha256(
          (template.system + "\0" + template.user).encode("utf-8")).hexdigest(),
  }


def check_resume(workdir: str, current: dict, requests) -> None:
  """Refuses to mix lines made under another model, sampling, template or data."""
  out = RunLayout(workdir).teacher_rationales
  path = RunLayout(workdir).teacher_manifest
  existing = rationales.by_user(rationales.read(out))
  if existing and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    changed = sorted(k for k in current if previous.get(k) != current[k])
    if changed:
      sys.exit(
          f"{out} holds {len(existing)} rationales made with different settings ({', '.join(changed)}"
          f" changed; see {path}). Use a new --workdir, restore the settings, or delete both "
          "files to start over.")
  for user_id, messages in requests:
    record = existing.get(user_id)
    if record is not None and record["messages"] != messages:
      sys.exit(
          f"{out}: the line for user {user_id} was made from a different prompt (the data, "
          "--template or --max_history changed). Use a new --workdir or delete the file.")
  io.write_json(path, current)


def count_tokens_fn():
  """(count(text) -> int, description); a real tokenizer when --tokenizer is given."""
  if not FLAGS.tokenizer:
    return (lambda text: max(1, round(len(text) / 4))), "estimated at 4 characters per token"
  import transformers  # pylint: disable=import-outside-toplevel
  from slim_jax.convert import gguf_llama  # pylint: disable=import-outside-toplevel
  path = FLAGS.tokenizer
  if path.endswith(".gguf"):
    tok = gguf_llama.load_tokenizer(path)
  else:
    tok = transformers.AutoTokenizer.from_pretrained(path)
  def count(text):
    return len(tok(text, add_special_tokens=False)["input_ids"])
  return count, f"counted with the tokenizer at {path}"


def dry_run(requests, price: tuple[float, float]) -> None:
  count, how = count_tokens_fn()
  user_id, messages = requests[0]
  print(f"Sample prompt (user {user_id}):")
  for m in messages:
    print(f"--- {m['role']} ---\n{m['content']}")
  per_user = [sum(count(m["content"]) for m in msgs) for _, msgs in requests]
  total = int(sum(per_user))
  most_out = len(requests) * FLAGS.max_tokens
  print(f"\nToken counts ({how}):")
  print(f"  sample prompt        {per_user[0]}")
  print(f"  users                {len(requests)}")
  print(f"  prompt tokens        mean {np.mean(per_user):.0f}, max {max(per_user)}, "
        f"total {total}")
  print(f"  completion tokens    at most {most_out} ({FLAGS.max_tokens} per user)")
  print(f"  cost at most         ${(total * price[0] + most_out * price[1]) / 1e6:.4f} "
        f"(--price={FLAGS.price})")


def print_summary(stats: client.Stats, price: tuple[float, float], out: str) -> dict:
  summary = stats.as_dict()
  summary["estimated_cost_usd"] = stats.cost(*price)
  summary["price_per_million_tokens"] = {"input": price[0], "output": price[1]}
  summary["output"] = out
  lines = [
      f"users: {stats.users_done} written, {stats.users_skipped} already done, "
      f"{stats.users_failed} failed",
      f"requests: {stats.requests} ({stats.retries} retries: "
      f"{dict(stats.retries_by_cause) or 'none'})",
      f"failures: {dict(stats.failures_by_cause) or 'none'}",
      f"unparsed rationales (kept, steps=null): {stats.parse_failures}",
      f"tokens: {stats.prompt_tokens} prompt + {stats.completion_tokens} completion",
      f"estimated cost: ${summary['estimated_cost_usd']:.4f}",
      f"time: {stats.seconds:.1f}s",
  ]
  print("Teacher stage summary\n  " + "\n  ".join(lines))
  return summary


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  price = parse_price(FLAGS.price)
  template = prompts.load_template(FLAGS.template) if FLAGS.template else prompts.PromptTemplate()
  dataset = load_dataset()
  users = choose_users(dataset.num_users, FLAGS.num_users, FLAGS.seed)
  requests = build_requests(dataset, users, template)
  if FLAGS.dry_run:
    dry_run(requests, price)
    return
  config = client.ClientConfig(
      base_url=FLAGS.teacher_base_url, model=FLAGS.teacher_model,
      temperature=FLAGS.temperature, top_p=FLAGS.top_p, max_tokens=FLAGS.max_tokens,
      seed=FLAGS.seed, timeout=FLAGS.timeout, max_retries=FLAGS.max_retries,
      concurrency=FLAGS.concurrency, backoff_initial=FLAGS.backoff_initial,
      backoff_max=FLAGS.backoff_max)
  key = os.environ.get(API_KEY_ENV) or None
  if key is None and FLAGS.teacher_base_url is None:
    raise app.UsageError(f"set {API_KEY_ENV} to call OpenAI, or point --teacher_base_url at "
                         "a local OpenAI-compatible server")
  out = RunLayout(FLAGS.workdir).teacher_rationales
  lock = hold_lock(RunLayout(FLAGS.workdir).teacher_lock)  # noqa: F841 (held until exit)
  removed = rationales.dedupe(out) if os.path.exists(out) else 0
  if removed:
    logging.warning("%s: dropped %d duplicate lines (the first line of each user is kept)",
                    out, removed)
  check_resume(FLAGS.workdir, manifest(config, template), requests)
  logging.info("asking %s for %d users (%d requested, seed %d)",
               FLAGS.teacher_base_url or "OpenAI", len(requests), FLAGS.num_users, FLAGS.seed)
  total = len(requests)

  def progress(stats: client.Stats) -> None:
    done = stats.users_done + stats.users_skipped
    if stats.users_done % 10 == 0 or done == total:
      logging.info("%d/%d users done (%d requests, %d retries)", done, total, stats.requests,
                   stats.retries)

  try:
    stats = client.collect(requests, out, config, key, progress=progress)
  except client.FatalError as e:
    print(f"teacher stage stopped: {e}", file=sys.stderr)
    sys.exit(2)
  summary = print_summary(stats, price, out)
  io.write_json(RunLayout(FLAGS.workdir).teacher_summary, summary)
  if stats.users_failed:
    print(f"{stats.users_failed} users failed; run the same command again to retry them.",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
