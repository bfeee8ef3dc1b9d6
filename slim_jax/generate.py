"""Batched text generation with the Flax LLaMA: left padding, a preallocated KV cache, a
jitted prefill and a jitted chunk of decode steps driven from Python.

Shapes are bucketed so few programs compile: the batch is padded to a power of two (up to
`max_batch_size`), the prompt length and the KV cache to a `cache_bucket` (16, 24, 32, 48,
64, then quarter steps between powers of two: 80, 96, 112, 128, 160, ..., 512, 640, 768,
896, 1024, 1280, ...). One prefill program per (batch, prompt, cache, shared prefix)
bucket and one decode program per (batch, cache, shared prefix) bucket; decoding never
recompiles per step.

Every decode step reads all of its cache slots (SmolLM2, 16 rows on 2 cores: about 60 ms
a step at 512 slots, 74 ms at 1024), so the cache starts at the bucket of prompt + one
decode chunk and grows to the next bucket whenever decoding reaches its end, up to the
bucket of prompt + max_new_tokens: a 512-token answer to a 512-token prompt reads 640, 768,
896, then 1024 slots instead of 1024 throughout. Each size is one more decode program, so
a long-lived server gains and a one-off run pays compiles: `pad_batches` turns growth off.

Prompts are left-padded, so every row writes its new token to the same cache slot;
positions count real tokens only (`cumsum(mask) - 1`), so a padded row computes what it
would alone.

Rows that share a leading run of tokens (a chat template's system prompt and instructions)
prefill it once and hold it once: its keys and values are computed for one row and kept
as a [1, K, L, H] prefix that every row's queries read (L rounded down to a multiple of
PREFIX_STEP, at least MIN_SHARED_PREFIX); each row's cache holds only its own tail,
left-padded, and what it generates: for the ml-100k student prompts (about 287 tokens, 64
shared) a 96-token answer decodes over 320 cache slots a row instead of 448. A batch of
one row shares nothing (it would only add a program per prompt length). On a CPU the
prefill runs a few rows at a time inside its program (slim_jax/row_chunks.py): 16 prompts
of 512 tokens took 7.1 s instead of 10.1 s on 2 cores.

Sampling parameters are per row (a server batches different requests): greedy where
temperature is 0, else temperature, top-k and top-p, each row with its own seeded key
(`fold_in(key(seed), step)`), so a row's tokens do not depend on its batch neighbours.
Rows stop on EOS (on device) and on stop strings or `max_new_tokens` (on the host, between
chunks). The callback receives text as it is produced: the concatenation of what it gets
for a row equals that row's final `Completion.text`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from slim_jax import row_chunks
from slim_jax.models import llama

DECODE_CHUNK = 8  # decode steps per jitted call: the streaming granularity
MIN_SHARED_PREFIX = 64  # shorter common prefixes are prefilled per row (not worth a program)
PREFIX_STEP = 16  # a shared prefix is rounded down to a multiple of this


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 256
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    elif not isinstance(self.stop, tuple):
      object.__setattr__(self, "stop", tuple(self.stop or ()))
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Completion:
  text: str
  token_ids: list[int]
  prompt_tokens: int
  completion_tokens: int
  finish_reason: str  # "stop" | "length"


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest size >= n in 16, 24, 32, 48, 64, 96, 128, ... (2^k and 1.5 * 2^k)."""
  size = minimum
  while True:
    if n <= size:
      return size
    if n <= size * 3 // 2:
      return size * 3 // 2
    size *= 2


def cache_bucket(n: int) -> int:
  """Smallest KV cache size >= n: `bucket` up to 64, then quarter steps between powers of
  two (64, 80, 96, 112, 128, 160, ..., 512, 640, 768, 896, 1024, 1280, ...), so a growing
  cache attends over at most a quarter more slots than it holds."""
  if n <= 64:
    return bucket(n)
  step = (1 << (n - 1).bit_length()) // 8
  return -(-n // step) * step


def batch_bucket(n: int, max_batch_size: int) -> int:
  return min(1 << max(0, (n - 1).bit_length()), max_batch_size)


def balanced_batch_size(n: int, max_batch_size: int) -> int:
  """Rows per batch that split `n` prompts into as few batches as `max_batch_size` allows,
  all about equally full: 200 prompts at most 32 a batch run as 7 of 29, not 6 of 32 and a
  seventh of 8 padded to 32 (with `pad_batches`, a padded row costs as much as a real one)."""
  if n < 1 or max_batch_size < 1:
    raise ValueError(f"need n >= 1 and max_batch_size >= 1, got {n} and {max_batch_size}")
  return -(-n // -(-n // max_batch_size))


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
  """Tokens every prompt starts with, rounded down to a multiple of PREFIX_STEP (one
  program per prefix length, few lengths), leaving each prompt at least one token of its
  own; 0 when under MIN_SHARED_PREFIX."""
  first, shortest = prompts[0], min(len(p) for p in prompts)
  n = 0
  while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
    n += 1
  n -= n % PREFIX_STEP
  return n if n >= MIN_SHARED_PREFIX else 0


# ----------------------------------------------------------------------------- sampling

def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
  """Next tokens [B] from logits [B, V], per-row temperature/top-k/top-p (0 temp = argmax)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def truncated(scaled):
    """`scaled` [B, V] with the tokens outside each row's top-k / top-p set to -inf."""
    v = scaled.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep = (before < top_p[:, None]) & (ordered > -jnp.inf)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)

  def stochastic(_):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]  # [B, V]
    # Sorting the vocabulary costs more than the rest of a CPU decode step: only rows that
    # ask for top-k or top-p pay for it.
    truncate = jnp.any((top_k > 0) & (top_k < logits.shape[-1])) | jnp.any(top_p < 1.0)
    masked = jax.lax.cond(truncate, truncated, lambda x: x, scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda _: greedy, None)


# ----------------------------------------------------------------------------- programs

def _next_tokens(eos_ids, pad_id, logits, state):
  """Samples each row's next token from logits [B, V]; updates counts and done flags."""
  keys = jax.vmap(jax.random.fold_in)(state["keys"], state["generated"])
  token = sample(logits, keys, state["temperature"], state["top_k"], state["top_p"])
  token = jnp.where(state["done"], pad_id, token)
  is_eos = jnp.any(token[:, None] == jnp.asarray(eos_ids, jnp.int32)[None], axis=-1)
  generated = state["generated"] + jnp.where(state["done"], 0, 1)
  done = state["done"] | is_eos | (generated >= state["max_new"])
  return dict(state, generated=generated, done=done, token=token)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _prefill(model, eos_ids, pad_id, chunk_tokens, cache_len: int, variables, inputs):
  """Runs the prompts through the model and samples token 1.

  inputs["ids"], ["mask"]: [B, P], left-padded, written to cache slots 0..P-1. With
  inputs["prefix"] [1, L] (tokens every row starts with, left out of ids), the prefix's
  keys and values are computed once into state["prefix"] [1, K, L, H], read by every row,
  and the rows' positions count from L.
  """
  ids, mask = inputs["ids"], inputs["mask"]
  b, p = ids.shape
  dtype = jnp.dtype(model.config.dtype)
  prefix = None
  start = 0
  if "prefix" in inputs:
    start = inputs["prefix"].shape[1]
    _, prefix = model.apply(variables, inputs["prefix"],
                            attention_mask=jnp.ones((1, start), bool),
                            positions=jnp.arange(start)[None],
                            cache=llama.init_cache(model.config, 1, start, dtype),
                            cache_index=0, last_only=True)
  cache = llama.init_cache(model.config, b, cache_len, dtype, llama.value_cache_dtype(dtype))
  cache_mask = jnp.zeros((b, cache_len), bool).at[:, :p].set(mask.astype(bool))
  positions = start + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)

  def run(rows):
    return model.apply(variables, rows["ids"], attention_mask=rows["cache_mask"],
                       positions=rows["positions"], cache=rows["cache"], cache_index=0,
                       last_only=True, prefix=prefix)

  # A few rows at a time on a CPU (slim_jax/row_chunks.py): rows attend only to themselves.
  per_chunk = row_chunks.chunk_rows(b, p, chunk_tokens)
  logits, cache = row_chunks.map_row_chunks(run, per_chunk, dict(
      ids=ids, cache_mask=cache_mask, positions=positions, cache=cache))
  state = dict({} if prefix is None else dict(prefix=prefix), cache=cache,
               cache_mask=cache_mask, index=jnp.asarray(p, jnp.int32),
               position=(start + jnp.sum(mask, axis=-1)).astype(jnp.int32),
               generated=jnp.zeros((b,), jnp.int32), done=inputs["done"],
               keys=inputs["keys"], temperature=inputs["temperature"], top_k=inputs["top_k"],
               top_p=inputs["top_p"], max_new=inputs["max_new"])
  return _next_tokens(eos_ids, pad_id, logits[:, 0], state)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode(model, eos_ids, pad_id, steps: int, variables, state):
  """`steps` decode steps; returns (state, tokens [B, steps], done after each [B, steps])."""

  def step(state, _):
    b = state["token"].shape[0]
    index = state["index"]
    cache_mask = jax.lax.dynamic_update_slice(state["cache_mask"], jnp.ones((b, 1), bool),
                                              (0, index))
    logits, cache = model.apply(variables, state["token"][:, None], attention_mask=cache_mask,
                                positions=state["position"][:, None], cache=state["cache"],
                                cache_index=index, prefix=state.get("prefix"))
    state = dict(state, cache=cache, cache_mask=cache_mask, index=index + 1,
                 position=state["position"] + 1)
    state = _next_tokens(eos_ids, pad_id, logits[:, 0], state)
    return state, (state["token"], state["done"])

  state, (tokens, done) = jax.lax.scan(step, state, None, length=steps)
  return state, tokens.T, done.T


@functools.partial(jax.jit, static_argnums=(0,))
def _grow_cache(cache_len: int, state):
  """The decode state with its KV cache [B, K, S, H] and cache mask [B, S] padded with
  empty slots to S = cache_len (not donated: XLA cannot reuse a smaller buffer)."""
  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, cache_len - x.shape[axis])
    return jnp.pad(x, widths)
  return dict(state, cache=jax.tree.map(lambda x: pad(x, 2), state["cache"]),
              cache_mask=pad(state["cache_mask"], 1))


# ----------------------------------------------------------------------------- generator

def _cast_floats(tree, dtype):
  """Device arrays, floating leaves in `dtype` (bfloat16 generation halves weight reads)."""
  def cast(x):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)


class Generator:
  """Owns the jitted programs; `generate` / `chat` run any number of prompts."""

  def __init__(self, config: llama.LlamaConfig, params, tokenizer, *, max_batch_size: int = 16,
               max_seq_len: int = 2048, lora=None, lora_scale: float = 1.0,
               dtype=jnp.float32, pad_batches: bool = False, share_prefix: bool = True,
               prefill_chunk_tokens: int | None = None):
    """`pad_batches`: every batch padded to `max_batch_size` rows, so one batch shape
    compiles instead of one per power of two, and the KV cache starts at its final size
    instead of growing (each size is a decode program, about 3.6 s to compile for SmolLM2
    on 2 cores): worth it when compiling costs more than the padded rows and slots, as in a
    CPU run of a few hundred prompts. `share_prefix`: prefill the tokens
    every prompt of a batch starts with once (see the module doc). `prefill_chunk_tokens`:
    tokens per prefill pass (slim_jax/row_chunks.py; default: chunked on CPU only)."""
    self.config = dataclasses.replace(config, dtype=dtype, remat=False)
    self.pad_batches = pad_batches
    self.share_prefix = share_prefix
    self.tokenizer = tokenizer
    self.max_batch_size = max_batch_size
    self.max_seq_len = max_seq_len
    self.dtype = jnp.dtype(dtype)
    self.model = llama.Llama(self.config, lora_scale=lora_scale)
    self.variables = {"params": _cast_floats(params, self.dtype)}
    if lora is not None:
      self.variables["lora"] = _cast_floats(lora, self.dtype)
    self.eos_ids = tuple(int(x) for x in config.eos_token_ids) or (-1,)
    self.pad_id = next(x for x in (config.pad_token_id, *config.eos_token_ids, 0)
                       if x is not None)
    # Module-level jitted programs: generators of the same model share compiled code.
    chunk_tokens = prefill_chunk_tokens or row_chunks.default_chunk_tokens()
    self._prefill = functools.partial(_prefill, self.model, self.eos_ids, self.pad_id,
                                      chunk_tokens)
    self._decode = functools.partial(_decode, self.model, self.eos_ids, self.pad_id)

  # --- host loop -------------------------------------------------------------------

  def _encode(self, prompt) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass token id lists instead")
      return list(self.tokenizer(prompt)["input_ids"])
    return [int(t) for t in prompt]

  def generate(self, prompts: Sequence[str | Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
               callback: Callable[[int, str], None] | None = None,
               should_stop: Callable[[int], bool] | None = None) -> list[Completion]:
    """Completions for `prompts` (text, tokenised with special tokens, or token ids).
    `should_stop(row)` true ends that row at the next decode chunk (finish_reason
    'cancelled'), e.g. when its client went away; the batch ends when every row has."""
    prompts = list(prompts)
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    sampling = list(sampling)
    if len(sampling) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(sampling)} SamplingParams")
    encoded = [self._encode(p) for p in prompts]
    for row, (ids, params) in enumerate(zip(encoded, sampling)):
      if not ids:
        raise ValueError(f"prompt {row} is empty")
      if len(ids) + params.max_new_tokens > self.max_seq_len:
        raise ValueError(f"prompt {row} has {len(ids)} tokens and asks for "
                         f"{params.max_new_tokens} new ones, more than max_seq_len="
                         f"{self.max_seq_len}; shorten it or lower max_new_tokens")
    # Batches of similar lengths pad less. A row's tokens do not depend on its batch, up to
    # rounding: in bf16 the batch's padding and shared prefix can round differently.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[Completion | None] = [None] * len(encoded)
    for start in range(0, len(order), self.max_batch_size):
      rows = order[start:start + self.max_batch_size]
      row_callback = row_stop = None
      if callback is not None:
        row_callback = functools.partial(lambda r, row, text: callback(r[row], text), rows)
      if should_stop is not None:
        row_stop = functools.partial(lambda r, row: should_stop(r[row]), rows)
      completions = self._generate_batch([encoded[i] for i in rows],
                                         [sampling[i] for i in rows], row_callback, row_stop)
      for i, completion in zip(rows, completions):
        out[i] = completion
    return out

  def buckets(self, rows: int, prompt_len: int, max_new_tokens: int,
              shared: int = 0) -> tuple[int, int, int]:
    """(batch, prompt length, cache length) the programs run at for such a batch; with a
    shared prefix of `shared` tokens (held apart, once), the prompt and the cache count
    the rest of each prompt."""
    p = cache_bucket(prompt_len - shared)  # quarter steps above 64: 224, not 256, for 223
    decode_steps = -(-(max_new_tokens - 1) // DECODE_CHUNK) * DECODE_CHUNK
    b = self.max_batch_size if self.pad_batches else batch_bucket(rows, self.max_batch_size)
    return b, p, cache_bucket(p + decode_steps)

  def _generate_batch(self, encoded: list[list[int]], sampling: list[SamplingParams],
                      callback, should_stop=None) -> list[Completion]:
    n = len(encoded)
    shared = shared_prefix_length(encoded) if self.share_prefix and n > 1 else 0
    b, p, cache_len = self.buckets(n, max(len(ids) for ids in encoded),
                                   max(s.max_new_tokens for s in sampling), shared)
    ids = np.full((b, p), self.pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for row, prompt in enumerate(encoded):
      tail = prompt[shared:]
      ids[row, p - len(tail):] = tail
      mask[row, p - len(tail):] = 1
    mask[n:, -1] = 1  # padding rows: one dummy token, done from the start
    fill = lambda f, default, dtype: np.asarray(  # noqa: E731
        [f(s) for s in sampling] + [default] * (b - n), dtype)
    inputs = dict(
        ids=ids, mask=mask, done=np.arange(b) >= n,
        keys=jax.vmap(jax.random.key)(fill(lambda s: s.seed % 2 ** 32, 0, np.uint32)),
        temperature=fill(lambda s: s.temperature, 0.0, np.float32),
        top_k=fill(lambda s: s.top_k, 0, np.int32),
        top_p=fill(lambda s: s.top_p, 1.0, np.float32),
        max_new=fill(lambda s: s.max_new_tokens, 1, np.int32))
    if shared:
      inputs["prefix"] = np.asarray(encoded[0][:shared], np.int32)[None]
    index = p  # the cache slot the next decode step writes
    # Slots until the cache next grows; with `pad_batches` (fewest programs) never.
    size = cache_len if self.pad_batches else min(cache_len, cache_bucket(index + DECODE_CHUNK))
    state = self._prefill(size, self.variables, inputs)
    rows = [_Row(self.tokenizer, sampling[r], self.eos_ids, len(encoded[r])) for r in range(n)]
    first, done = jax.device_get((state["token"], state["done"]))
    self._consume(rows, first[:, None], done[:, None], callback, should_stop)
    while not all(r.finished for r in rows):
      if any(r.finished and not d for r, d in zip(rows, done)):  # stopped by a stop string
        state["done"] = jnp.asarray(np.asarray(done) | np.asarray(
            [r.finished for r in rows] + [True] * (b - n)))
      if index + DECODE_CHUNK > size:
        size = min(cache_len, cache_bucket(index + DECODE_CHUNK))
        state = _grow_cache(size, state)
      state, tokens, done_steps = self._decode(DECODE_CHUNK, self.variables, state)
      index += DECODE_CHUNK
      tokens, done_steps = jax.device_get((tokens, done_steps))
      self._consume(rows, tokens, done_steps, callback, should_stop)
      done = done_steps[:, -1]
    return [r.completion() for r in rows]

  @staticmethod
  def _consume(rows, tokens, done, callback, should_stop=None) -> None:
    for i, row in enumerate(rows):
      if row.finished:
        continue
      if should_stop is not None and should_stop(i):
        row.finished, row.finish_reason = True, "cancelled"
        continue
      row.add(tokens[i].tolist(), done[i].tolist())
      new_text = row.take_stream_text()
      if callback is not None and new_text:
        callback(i, new_text)

  # --- chat ------------------------------------------------------------------------

  def render_chat(self, messages: list[dict]) -> str:
    if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
      raise ValueError("chat needs a tokenizer with a chat template (tokenizer_config.json "
                       "'chat_template', or the GGUF's tokenizer.chat_template)")
    return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)

  def chat(self, conversations: Sequence[list[dict]],
           sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
           callback: Callable[[int, str], None] | None = None,
           should_stop: Callable[[int], bool] | None = None) -> list[Completion]:
    """Completions of chat conversations (the template's special tokens, no extra BOS)."""
    prompts = [self.chat_ids(m) for m in conversations]
    return self.generate(prompts, sampling, callback, should_stop)

  def chat_ids(self, messages: list[dict]) -> list[int]:
    """A conversation's prompt tokens: the template's special tokens, no extra BOS."""
    return self.tokenizer(self.render_chat(messages), add_special_tokens=False)["input_ids"]


def streamable_end(text: str, stop: Sequence[str]) -> int:
  """How much of an unfinished row's `text` can be streamed: not an unfinished multi-byte
  character at the end, nor a tail that may still grow into one of the `stop` strings
  (streamed text cannot be taken back, and the final text ends before a stop string)."""
  end = len(text.rstrip("\ufffd"))
  for s in stop:
    for k in range(min(len(s) - 1, end), 0, -1):
      if text[:end].endswith(s[:k]):
        end -= k
        break
  return end


class _Row:
  """Host-side state of one row: tokens so far, stop strings, text streamed so far."""

  def __init__(self, tokenizer, sampling: SamplingParams, eos_ids, prompt_tokens: int):
    self.tokenizer = tokenizer
    self.sampling = sampling
    self.eos_ids = set(int(x) for x in eos_ids)
    self.prompt_tokens = prompt_tokens
    self.token_ids: list[int] = []
    self.text = ""
    self.streamed = 0  # characters of `text` already given to the callback
    self.finished = False
    self.finish_reason = "length"

  def _decode(self, ids: list[int]) -> str:
    if self.tokenizer is None:
      return ""
    # No clean-up of spaces: it can rewrite earlier text, and the stream must only append.
    return self.tokenizer.decode(ids, skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)

  def _stop_at(self, text: str) -> int:
    return min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)

  def add(self, tokens: list[int], device_done: list[bool]) -> None:
    """Appends a chunk of sampled tokens (and the device's done flag after each)."""
    before = len(self.token_ids)
    for token, done in zip(tokens, device_done):
      if token in self.eos_ids:
        self.finished, self.finish_reason = True, "stop"
        break
      self.token_ids.append(token)
      if len(self.token_ids) >= self.sampling.max_new_tokens or done:
        self.finished = True
        break
    self.text = self._decode(self.token_ids)
    if self.sampling.stop and self._stop_at(self.text) >= 0:
      # The first token of this chunk after which a stop string appears ends the row.
      for n in range(before + 1, len(self.token_ids) + 1):
        text = self._decode(self.token_ids[:n])
        cut = self._stop_at(text)
        if cut >= 0:
          self.token_ids = self.token_ids[:n]
          self.text = text[:cut]
          self.finished, self.finish_reason = True, "stop"
          break

  def take_stream_text(self) -> str:
    """New text safe to stream: whole characters, never a possible stop-string prefix."""
    end = len(self.text) if self.finished else streamable_end(self.text, self.sampling.stop)
    end = max(end, self.streamed)
    new = self.text[self.streamed:end]
    self.streamed = end
    return new

  def completion(self) -> Completion:
    return Completion(text=self.text, token_ids=list(self.token_ids),
                      prompt_tokens=self.prompt_tokens, completion_tokens=len(self.token_ids),
                      finish_reason=self.finish_reason)
