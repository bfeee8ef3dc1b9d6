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

import os
import sys

from absl import app, flags, logging
import numpy as np

from slim_jax.pipeline.layout import RunLayout
from slim_jax.pipeline import stages
from slim_jax.teacher import client, prompts

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "ml-100k", "Dataset name, as experiments/prepare_data.py takes it.")
flags.DEFINE_string("data_dir", None, "Raw data folder (Amazon files); unused for ml-100k and "
                    "synthetic.")
flags.DEFINE_string("workdir", None, "Run folder: holds the prepared data and rationales/.")
flags.DEFINE_integer("num_users", 0, "Size of the user subset U' (seeded); 0: every user.")
flags.DEFINE_integer("seed", 0, "Seed for choosing U' and for the endpoint's sampling.")
flags.DEFINE_integer("max_history", prompts.DEFAULT_MAX_HISTORY,
                     "Most recent training-prefix items shown in a prompt.")
flags.DEFINE_list("kinds", list(prompts.KINDS), "Rationales to write per user: 'eval' (from "
                  "the whole training prefix, teacher.jsonl) and 'train' (up to a cutoff "
                  "--holdout items before its end, teacher_train.jsonl).")
flags.DEFINE_integer("holdout", prompts.DEFAULT_RATIONALE_HOLDOUT,
                     "A training rationale is written from the training prefix less its last "
                     "this many items (at most half of it), docs/causal_rationales.md.")
flags.DEFINE_string("template", None, "Prompt template file: the user message with a "
                    "{history} placeholder (optionally {num_items}); a line '---' splits off a "
                    "system message above it. Default: the built-in three-step prompt.")
flags.DEFINE_string("teacher_base_url", None, "OpenAI-compatible base URL, e.g. "
                    "http://127.0.0.1:8000/v1; default: OpenAI.")
_C = client.ClientConfig  # the dataclass holds the defaults
flags.DEFINE_string("teacher_model", _C.model, "Model name sent to the endpoint.")
flags.DEFINE_float("temperature", _C.temperature, "Sampling temperature.")
flags.DEFINE_float("top_p", _C.top_p, "Nucleus sampling mass.")
flags.DEFINE_integer("max_tokens", _C.max_tokens, "Most tokens in one rationale.")
flags.DEFINE_integer("concurrency", _C.concurrency, "Requests in flight at once.")
flags.DEFINE_float("timeout", _C.timeout, "Seconds before a request counts as timed out.")
flags.DEFINE_integer("max_retries", _C.max_retries,
                     "Retries per user on 429/408/409/5xx/timeouts/drops/malformed bodies.")
flags.DEFINE_integer("max_server_error_retries", _C.max_server_error_retries,
                     "Of those, at most this many on 5xx answers.")
flags.DEFINE_bool("allow_insecure_key", _C.allow_insecure_key,
                  "Send OPENAI_API_KEY over plain http to a non-loopback host.")
flags.DEFINE_float("backoff_initial", _C.backoff_initial,
                   "First retry wait in seconds (doubles, jittered).")
flags.DEFINE_float("backoff_max", _C.backoff_max, "Longest backoff wait in seconds.")
flags.DEFINE_integer("requests_per_minute", _C.requests_per_minute,
                     "Most requests sent in any minute, retries included (0: no limit).")
flags.DEFINE_integer("tokens_per_minute", _C.tokens_per_minute,
                     "Most prompt + completion tokens in any minute, counted from a bound "
                     "before each request and from the reported usage after (0: no limit).")
flags.DEFINE_integer("max_total_tokens", _C.max_total_tokens,
                     "Spending cap of this run, prompt + completion tokens: the stage stops "
                     "asking before a request that might pass it and keeps everything done "
                     "(0: no cap).")
# Flags that set a ClientConfig field (tests/experiments/test_flag_defaults.py).
CONFIG_FIELDS = {"teacher_model": "model", "temperature": "temperature", "top_p": "top_p",
                 "max_tokens": "max_tokens", "concurrency": "concurrency",
                 "timeout": "timeout", "max_retries": "max_retries",
                 "backoff_initial": "backoff_initial", "backoff_max": "backoff_max",
                 "max_server_error_retries": "max_server_error_retries",
                 "allow_insecure_key": "allow_insecure_key",
                 "requests_per_minute": "requests_per_minute",
                 "tokens_per_minute": "tokens_per_minute",
                 "max_total_tokens": "max_total_tokens"}
flags.DEFINE_string("price", "0,0", "USD per million tokens, 'INPUT,OUTPUT' (or one number for "
                    "both), for the cost estimate.")
flags.DEFINE_bool("dry_run", False, "Print a sample prompt and token counts; call nothing.")
flags.DEFINE_string("tokenizer", None, "Tokenizer for --dry_run counts: a Hugging Face folder "
                    "or a .gguf file. Default: an estimate of 4 characters per token.")

API_KEY_ENV = "OPENAI_API_KEY"



def parse_price(text: str) -> tuple[float, float]:
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) not in (1, 2) or any(v < 0 for v in values):
    raise app.UsageError(f"--price={text!r}: give 'INPUT,OUTPUT' USD per million tokens, e.g. "
                         "--price=0.5,1.5, or one number for both")
  return (values[0], values[-1])







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


def dry_run(requests_by_kind: dict, price: tuple[float, float]) -> None:
  """requests_by_kind: stages.teacher_requests' {kind: [TeacherRequest]}."""
  count, how = count_tokens_fn()
  requests = [r for kind_requests in requests_by_kind.values() for r in kind_requests]
  first = requests[0]
  print(f"Sample prompt (user {first.user}, written from the first {first.cutoff} training "
        "items):")
  for m in first.messages:
    print(f"--- {m['role']} ---\n{m['content']}")
  per_user = [sum(count(m["content"]) for m in r.messages) for r in requests]
  total = int(sum(per_user))
  most_out = len(requests) * FLAGS.max_tokens
  print(f"\nToken counts ({how}):")
  print(f"  sample prompt        {per_user[0]}")
  print(f"  requests             {len(requests)} "
        f"({', '.join(f'{len(v)} {k}' for k, v in requests_by_kind.items())})")
  print(f"  prompt tokens        mean {np.mean(per_user):.0f}, max {max(per_user)}, "
        f"total {total}")
  print(f"  completion tokens    at most {most_out} ({FLAGS.max_tokens} per user)")
  print(f"  cost at most         ${(total * price[0] + most_out * price[1]) / 1e6:.4f} "
        f"(--price={FLAGS.price})")


def print_summary(stats, price: tuple[float, float]) -> None:
  lines = [
      f"users: {stats.users_done} written, {stats.users_skipped} already done, "
      f"{stats.users_failed} failed, {stats.users_over_cap} not asked (spending cap)",
      f"requests: {stats.requests} ({stats.retries} retries: "
      f"{dict(stats.retries_by_cause) or 'none'})",
      f"failures: {dict(stats.failures_by_cause) or 'none'}",
      f"unparsed rationales (kept, steps=null): {stats.parse_failures}",
      f"cut by max_tokens (kept, finish_reason=length): {stats.cut_by_length}",
      f"tokens: {stats.prompt_tokens} prompt + {stats.completion_tokens} completion",
      f"estimated cost: ${stats.cost(*price):.4f}",
      f"time: {stats.seconds:.1f}s ({stats.rate_limit_wait_seconds:.1f}s waiting for the "
      "rate limits)",
  ]
  print("Teacher stage summary\n  " + "\n  ".join(lines))


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  layout = RunLayout(FLAGS.workdir)
  bad = [k for k in FLAGS.kinds if k not in prompts.KINDS]
  if bad or not FLAGS.kinds:
    raise app.UsageError(f"--kinds={','.join(FLAGS.kinds)}: choose one or more of "
                         f"{','.join(prompts.KINDS)}")
  config = stages.TeacherConfig(
      client=client.ClientConfig(
          base_url=FLAGS.teacher_base_url, model=FLAGS.teacher_model,
          temperature=FLAGS.temperature, top_p=FLAGS.top_p, max_tokens=FLAGS.max_tokens,
          seed=FLAGS.seed, timeout=FLAGS.timeout, max_retries=FLAGS.max_retries,
          concurrency=FLAGS.concurrency, backoff_initial=FLAGS.backoff_initial,
          backoff_max=FLAGS.backoff_max,
          max_server_error_retries=FLAGS.max_server_error_retries,
          allow_insecure_key=FLAGS.allow_insecure_key,
          requests_per_minute=FLAGS.requests_per_minute,
          tokens_per_minute=FLAGS.tokens_per_minute,
          max_total_tokens=FLAGS.max_total_tokens),
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, num_users=FLAGS.num_users,
      seed=FLAGS.seed, max_history=FLAGS.max_history, template=FLAGS.template,
      price=parse_price(FLAGS.price), holdout=FLAGS.holdout, kinds=tuple(FLAGS.kinds))
  if FLAGS.dry_run:
    try:
      dry_run(stages.teacher_requests(layout, config), config.price)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    return
  key = os.environ.get(API_KEY_ENV) or None
  if key is None and FLAGS.teacher_base_url is None:
    raise app.UsageError(f"set {API_KEY_ENV} to call OpenAI, or point --teacher_base_url at "
                         "a local OpenAI-compatible server")
  try:
    stats = stages.teacher(layout, config, key)
  except stages.TeacherLocked as e:
    sys.exit(str(e))
  except client.FatalError as e:
    print(f"teacher stage stopped: {e}", file=sys.stderr)
    sys.exit(2)
  except ValueError as e:  # settings differ from the lines already written
    sys.exit(str(e))
  print_summary(stats, config.price)
  if stats.users_over_cap:
    print(f"stopped at --max_total_tokens={FLAGS.max_total_tokens}: "
          f"{stats.users_over_cap} requests not sent; every answer so far is kept in "
          f"{layout.rationales}. Rerun with a cap for the rest to continue.", file=sys.stderr)
    sys.exit(3)
  if stats.users_failed:
    print(f"{stats.users_failed} users failed; run the same command again to retry them.",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
