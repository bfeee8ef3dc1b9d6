"""Knowledge encoding (SLIM step 3): item descriptions and rationales -> text vectors.

`TextEncoder` turns texts into pooled sentence vectors with the Flax BERT of
slim_jax/models/bert.py; `run_stage` is the encoding stage that experiments/encode.py runs.

Stage contract (the SLIM recommender stage reads these files):

  inputs   <workdir>/data/items.jsonl, users.jsonl        (slim_jax/data/dataset.py)
           <workdir>/rationales/{teacher,student}{,_train}.jsonl
                                                  (slim_jax/teacher/rationales.py)
  outputs  <workdir>/embeddings/
    items.npy              [num_items + 1, D] float32; row i is item i's text vector `text`;
                           row 0 (the padding id) is zeros
    S.npy                  [num_users, D] float32 for each rationale source S present
                           (encode.SOURCES): row u is user u's `response` vector, zeros
                           where the user has no rationale
    S.present.npy          [num_users] bool: which rows of S.npy hold a rationale
    S.cutoff.npy           [num_users] int32: how many training-prefix items row u's
                           rationale was written from (its `cutoff`; the whole prefix
                           when the record has none); 0 where absent
    S_step{1,2,3}.npy      the same for one step's text (`steps.stepK`); a user whose
    S_step{1,2,3}.present.npy   response did not parse into steps is absent there
    manifest.json          encoder (path, weights hash, pooling, normalize, dim,
                           max_length, dtype) and, per output, the sha256 of every row's
                           text (null for absent rows), rows, truncated and empty counts
    cache/<encoder key>/   text sha256 -> vector chunks (`EmbeddingCache`)
    cache/xla/             XLA's compilation cache (set by experiments/encode.py)

Vectors are pooled (mean over real tokens, the [CLS] state, or the pooler output) and, when
asked, L2-normalised; the defaults come from a sentence-transformers folder's
1_Pooling/config.json and modules.json (a Normalize module), and the maximum length from its
sentence_bert_config.json, as sentence-transformers does (all-MiniLM-L6-v2: mean,
normalised, 256 tokens).

Every file is written atomically (temporary name, then rename), and the manifest last. A
rerun encodes only texts whose sha256 is not in the cache for this encoder, and rewrites only
outputs whose texts changed: re-running encodes nothing; editing one item's description
encodes that one text. Texts longer than the maximum length are truncated (counted and
reported); an empty text is encoded as "" (only [CLS] [SEP]) with a warning naming the ids.
A malformed rationale line is an error naming file:line before anything is written (or, with
`skip_bad_lines`, skipped and reported); outputs from earlier runs are never removed.

Batches are built from texts sorted by token length; each batch is padded to the next of a
few bucket lengths (`bucket_lengths`) and to a full batch (the last, short batch to a power
of two), so XLA compiles about one program per bucket. On a CPU the jitted program runs a
batch through the encoder a few rows at a time (slim_jax/row_chunks.py): a [64, 128] batch
as eight [8, 128] passes whose feed-forward activations stay in cache, about 1.6 times
faster on 2 cores. Rows are independent, so the vectors are the same.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slim_jax import row_chunks
from slim_jax import io
from slim_jax.data import dataset as dataset_lib
from slim_jax.convert import pretrained
from slim_jax.models import bert
from slim_jax.pipeline.layout import RunLayout

POOLING_MODES = ("mean", "cls", "pooler")
# Evaluation and training rationales of each writer (teacher/prompts.py KINDS).
SOURCES = ("teacher", "teacher_train", "student", "student_train")
STEPS = ("step1", "step2", "step3")


# ----------------------------------------------------------------------------- pooling

def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of hidden [B, T, D] over the tokens where mask [B, T] is 1 -> [B, D]."""
  m = mask.astype(hidden.dtype)[..., None]  # [B, T, 1]
  return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pool(hidden: jax.Array, mask: jax.Array, mode: str, pooled: jax.Array | None = None):
  """Sentence vectors [B, D] from hidden [B, T, D] by `mode` (one of POOLING_MODES)."""
  if mode == "mean":
    return mean_pool(hidden, mask)
  if mode == "cls":
    return hidden[:, 0]
  if mode == "pooler":
    if pooled is None:
      raise ValueError("pooling 'pooler' needs the pooler output")
    return pooled
  raise ValueError(f"unknown pooling {mode!r}; one of {POOLING_MODES}")


@dataclasses.dataclass(frozen=True)
class FolderDefaults:
  pooling: str
  normalize: bool
  max_length: int | None  # None: the model's max_position_embeddings


def _read_json(file: str):
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from e


def folder_defaults(path: str) -> FolderDefaults:
  """Pooling, normalisation and max length a sentence-transformers folder declares.

  A plain Hugging Face BERT folder (no modules.json, no 1_Pooling) gives mean pooling,
  no normalisation and the model's own maximum length.
  """
  modules_file = os.path.join(path, "modules.json")
  modules = _read_json(modules_file) if os.path.exists(modules_file) else []
  pooling_dir = next((m.get("path") for m in modules if m.get("type", "").endswith(".Pooling")),
                     "1_Pooling")
  pooling = "mean"
  pooling_file = os.path.join(path, pooling_dir or "1_Pooling", "config.json")
  if os.path.exists(pooling_file):
    conf = _read_json(pooling_file)
    chosen = [mode for mode, key in (("mean", "pooling_mode_mean_tokens"),
                                     ("cls", "pooling_mode_cls_token")) if conf.get(key)]
    others = [k for k, v in conf.items() if k.startswith("pooling_mode") and v and k not in (
        "pooling_mode_mean_tokens", "pooling_mode_cls_token")]
    if len(chosen) != 1 or others:
      raise ValueError(f"{pooling_file}: only one of mean or CLS pooling is supported "
                       f"(found mean/cls={chosen}, other modes={others}); pass --pooling")
    pooling = chosen[0]
  normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
  st_file = os.path.join(path, "sentence_bert_config.json")
  max_length = None
  if os.path.exists(st_file):
    max_length = _read_json(st_file).get("max_seq_length")
  return FolderDefaults(pooling, normalize, max_length)


# ----------------------------------------------------------------------------- batching

def bucket_lengths(max_length: int) -> list[int]:
  """Padded lengths a batch may take: steps of 8 up to 64, then 16, then max_length."""
  out, n = [], 8
  while n < max_length:
    out.append(n)
    n += 8 if n < 64 else 16
  return out + [max_length]


def batch_rows(n: int, batch_size: int) -> int:
  """Rows a batch of n texts is padded to: batch_size, or for the one short last batch the
  next power of two (at most one more compiled shape, far less padding)."""
  return batch_size if n >= batch_size else min(batch_size, 1 << max(n - 1, 0).bit_length())


def plan_batches(lengths: Sequence[int], batch_size: int,
                 buckets: Sequence[int]) -> list[tuple[np.ndarray, int]]:
  """[(text indices, padded length)]: texts sorted longest first, batch_size per batch."""
  order = np.argsort(-np.asarray(lengths, np.int64), kind="stable")
  batches = []
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    longest = int(lengths[chunk[0]])
    batches.append((chunk, next(b for b in buckets if b >= longest)))
  return batches


# ----------------------------------------------------------------------------- encoder

@dataclasses.dataclass
class EncodeStats:
  texts: int = 0
  truncated: int = 0
  tokens: int = 0  # real tokens after truncation
  padded_tokens: int = 0  # tokens the model computed, padding included
  seconds: float = 0.0


class TextEncoder:
  """Pooled sentence vectors from a Hugging Face BERT folder, bucketed and jitted."""

  def __init__(self, path: str, pooling: str | None = None, normalize: bool | None = None,
               max_length: int | None = None, batch_size: int = 64, dtype: str = "float32",
               chunk_tokens: int | None = None):
    self.path = os.path.abspath(os.fspath(path))
    self.config, params, self.tokenizer = pretrained.load_bert(self.path, dtype=dtype)
    self.params = jax.device_put(params)  # once, not on every jitted call
    del params
    if self.tokenizer is None:
      raise FileNotFoundError(f"{self.path}: no tokenizer files (tokenizer.json or vocab.txt);"
                              " the encoder folder needs its tokenizer")
    defaults = folder_defaults(self.path)
    self.pooling = pooling or defaults.pooling
    if self.pooling not in POOLING_MODES:
      raise ValueError(f"pooling {self.pooling!r} is not one of {POOLING_MODES}")
    if self.pooling == "pooler" and not self.config.add_pooling_layer:
      raise ValueError(f"{self.path}: pooling 'pooler' needs pooler weights, which this "
                       "checkpoint lacks; use --pooling=mean or cls")
    self.normalize = defaults.normalize if normalize is None else bool(normalize)
    limit = self.config.max_position_embeddings
    self.max_length = int(max_length or defaults.max_length or limit)
    if not 2 < self.max_length <= limit:
      raise ValueError(f"max_length {self.max_length} must be in 3..{limit} "
                       "(max_position_embeddings of the model)")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.batch_size = batch_size
    self.chunk_tokens = chunk_tokens or row_chunks.default_chunk_tokens()
    self.dtype = dtype
    self.buckets = bucket_lengths(self.max_length)
    self._forward = jax.jit(self._vectors)
    self._identity: dict | None = None

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def identity(self) -> dict:
    """What the vectors depend on: weights and config hashes, pooling, length, dtype."""
    if self._identity is None:
      digest = hashlib.sha256()
      files = sorted(glob.glob(os.path.join(self.path, "*.safetensors"))) + [
          os.path.join(self.path, f) for f in ("config.json", "tokenizer.json", "vocab.txt")]
      for file in files:
        if os.path.exists(file):
          digest.update(os.path.basename(file).encode())
          with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):  # pylint: disable=cell-var-from-loop
              digest.update(block)
      self._identity = {"path": self.path, "files_sha256": digest.hexdigest(),
                        "pooling": self.pooling, "normalize": self.normalize,
                        "dim": self.dim, "max_length": self.max_length, "dtype": self.dtype}
    return self._identity

  def cache_key(self) -> str:
    """Short hash of the identity without the path (a moved folder keeps its cache)."""
    ident = {k: v for k, v in self.identity().items() if k != "path"}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

  def _vectors(self, params, ids, mask):
    """[B, D] float32 vectors for ids/mask [B, T], a few rows at a time on a CPU."""
    per_chunk = row_chunks.chunk_rows(*ids.shape, self.chunk_tokens)
    return row_chunks.map_row_chunks(lambda rows: self._chunk_vectors(params, *rows),
                                     per_chunk, (ids, mask))

  def _chunk_vectors(self, params, ids, mask):
    out = bert.Bert(self.config).apply({"params": params}, ids, attention_mask=mask,
                                       return_pooled=self.pooling == "pooler")
    hidden, pooled = out if self.pooling == "pooler" else (out, None)
    vectors = pool(hidden.astype(jnp.float32), mask, self.pooling,
                   None if pooled is None else pooled.astype(jnp.float32))
    return l2_normalize(vectors) if self.normalize else vectors

  def _full_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return self.tokenizer(list(texts), add_special_tokens=True, truncation=False,
                          verbose=False)["input_ids"]

  def count_truncated(self, texts: Sequence[str]) -> int:
    """How many texts are longer than max_length tokens (special tokens included)."""
    return sum(len(x) > self.max_length for x in self._full_ids(texts)) if texts else 0

  def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
    """Token ids with special tokens, truncated to max_length; and which were truncated."""
    ids = self._full_ids(texts)
    truncated = np.array([len(x) > self.max_length for x in ids], bool)
    if truncated.any():
      long = np.flatnonzero(truncated)
      cut = self.tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True,
                           max_length=self.max_length)["input_ids"]
      for i, row in zip(long, cut):
        ids[i] = row
    return ids, truncated

  def encode(self, texts: Sequence[str], progress: bool = False,
             desc: str = "encoding") -> tuple[np.ndarray, EncodeStats]:
    """Vectors [len(texts), D] float32 in the order of `texts`, and counts."""
    start = time.perf_counter()
    out = np.zeros((len(texts), self.dim), np.float32)
    stats = EncodeStats(texts=len(texts))
    if not texts:
      return out, stats
    ids, truncated = self.tokenize(texts)
    stats.truncated = int(truncated.sum())
    lengths = [len(x) for x in ids]
    stats.tokens = int(sum(lengths))
    pad = self.tokenizer.pad_token_id or 0
    batches = plan_batches(lengths, self.batch_size, self.buckets)
    bar = None
    if progress:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=len(texts), desc=desc, unit="text", disable=None)
    pending = []  # (indices, device vectors): fetched one batch behind, so host work overlaps

    def fetch(item):
      index, vectors = item
      out[index] = np.asarray(vectors)[:len(index)]
      if bar is not None:
        bar.update(len(index))

    for index, length in batches:
      rows = batch_rows(len(index), self.batch_size)
      batch_ids = np.full((rows, length), pad, np.int32)
      mask = np.zeros((rows, length), np.int32)
      for row, i in enumerate(index):
        batch_ids[row, :lengths[i]] = ids[i]
        mask[row, :lengths[i]] = 1
      stats.padded_tokens += rows * length
      pending.append((index, self._forward(self.params, batch_ids, mask)))
      if len(pending) > 1:
        fetch(pending.pop(0))
    for item in pending:
      fetch(item)
    if bar is not None:
      bar.close()
    stats.seconds = time.perf_counter() - start
    return out, stats


# ----------------------------------------------------------------------------- cache

def text_sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
  """text sha256 -> vector for one encoder, as chunk files <dir>/chunk-*.npz.

  Each `add` writes one new chunk atomically, so an interrupted run keeps every finished
  chunk. Past `max_chunks` chunks they are merged into one.
  """

  def __init__(self, directory: str, dim: int, max_chunks: int = 32):
    self.directory = directory
    self.dim = dim
    self.max_chunks = max_chunks
    self._vectors: dict[str, np.ndarray] = {}
    self._load()

  def _chunks(self) -> list[str]:
    return sorted(glob.glob(os.path.join(self.directory, "chunk-*.npz")))

  def _load(self) -> None:
    for file in self._chunks():
      try:
        with np.load(file) as data:
          hashes, vectors = data["hashes"], data["vectors"]
      except (OSError, ValueError, KeyError) as e:
        logging.warning("%s: unreadable cache chunk (%s); ignoring it (its texts are encoded "
                        "again)", file, e)
        continue
      if vectors.shape != (len(hashes), self.dim):
        logging.warning("%s: vectors of shape %s do not fit dim %d; ignoring it", file,
                        vectors.shape, self.dim)
        continue
      for h, v in zip(hashes.tolist(), vectors):
        self._vectors[h] = v

  def __contains__(self, digest: str) -> bool:
    return digest in self._vectors

  def __len__(self) -> int:
    return len(self._vectors)

  def get(self, digest: str) -> np.ndarray:
    return self._vectors[digest]

  def add(self, digests: Sequence[str], vectors: np.ndarray) -> None:
    if not len(digests):
      return
    os.makedirs(self.directory, exist_ok=True)
    name = f"chunk-{time.time_ns():020d}-{os.getpid()}.npz"
    self._write(os.path.join(self.directory, name), list(digests), vectors)
    for h, v in zip(digests, vectors):
      self._vectors[h] = v
    chunks = self._chunks()
    if len(chunks) > self.max_chunks:
      keys = sorted(self._vectors)
      merged = os.path.join(self.directory, f"chunk-{time.time_ns():020d}-{os.getpid()}m.npz")
      self._write(merged, keys, np.stack([self._vectors[k] for k in keys]))
      for file in chunks:
        os.remove(file)

  @staticmethod
  def _write(path: str, digests: list[str], vectors: np.ndarray) -> None:
    with io.atomic_open(path, "wb") as f:
      np.savez(f, hashes=np.array(digests, dtype="U64"),
               vectors=np.asarray(vectors, np.float32))


def encode_cached(encoder: TextEncoder, cache: EmbeddingCache, texts: Sequence[str],
                  progress: bool = False, desc: str = "encoding"
                  ) -> tuple[np.ndarray, EncodeStats]:
  """Vectors [len(texts), D] for `texts`; encodes (and caches) only unseen texts.

  The stats count the texts actually encoded now (texts) and their truncations.
  """
  digests = [text_sha256(t) for t in texts]
  missing: dict[str, str] = {}
  for d, t in zip(digests, texts):
    if d not in cache and d not in missing:
      missing[d] = t
  stats = EncodeStats()
  if missing:
    vectors, stats = encoder.encode(list(missing.values()), progress=progress, desc=desc)
    cache.add(list(missing), vectors)
  out = np.zeros((len(texts), encoder.dim), np.float32)
  for row, d in enumerate(digests):
    out[row] = cache.get(d)
  return out, stats


# ----------------------------------------------------------------------------- stage

@dataclasses.dataclass
class Output:
  """One matrix to write: texts by row (None: absent row, zeros)."""

  name: str
  texts: list[str | None]
  row_ids: list[Any]  # item or user id of each row, for messages
  first_row_zero: bool = False  # items.npy: row 0 is the padding id
  cutoffs: list[int] | None = None  # rationales: per row, the cutoff (0 = absent row)

  def hashes(self) -> list[str | None]:
    return [None if t is None else text_sha256(t) for t in self.texts]


def read_rationales(path: str, num_users: int, skip_bad_lines: bool = False
                    ) -> tuple[dict[int, dict], list[str]]:
  """user_id -> record (first wins) from a rationale JSONL; and the skipped lines' reasons.

  A malformed line (bad JSON, missing keys, user_id out of range) raises an error naming
  path:line, unless skip_bad_lines. A torn last line (an interrupted writer) is skipped.
  """
  from slim_jax.teacher import rationales  # pylint: disable=import-outside-toplevel

  def check(record, where):
    if not isinstance(record, dict):
      raise ValueError("not a JSON object")
    rationales.validate(record, where)
    if not 0 <= record["user_id"] < num_users:
      raise ValueError(f"user_id {record['user_id']} is outside 0..{num_users - 1} of the "
                       "prepared data")
    for key in STEPS if record["steps"] is not None else ():
      if record["steps"][key] is not None and not isinstance(record["steps"][key], str):
        raise ValueError(f"steps.{key} must be a string or null")

  skipped: list[str] = []
  rows = io.read_jsonl(path, check, what="rationale line",
                       hint="fix or delete the line, or pass --skip_bad_lines to skip it "
                       "(nothing was written)", skipped=skipped if skip_bad_lines else None)
  records: dict[int, dict] = {}
  for record in rows:
    records.setdefault(record["user_id"], record)
  for message in skipped:
    logging.warning("skipped %s", message)
  return records, skipped


def plan_outputs(workdir: str, sources: Sequence[str] | None = None,
                 skip_bad_lines: bool = False) -> tuple[list[Output], dict]:
  """Reads every input and decides the matrices to write; nothing is written here."""
  data = dataset_lib.load(RunLayout(workdir).data)
  outputs = [Output("items", [None] + [it.text for it in data.items],
                    [0] + [it.item_id for it in data.items], first_row_zero=True)]
  report: dict[str, Any] = {"skipped_lines": {}}
  explicit = sources is not None
  for source in (sources if explicit else SOURCES):
    if source not in SOURCES:
      raise ValueError(f"unknown rationale source {source!r}; one of {SOURCES}")
    path = RunLayout(workdir).rationale_file(source)
    if not os.path.exists(path):
      if explicit:
        raise FileNotFoundError(f"{path} does not exist: run the {source} stage first, or "
                                "leave it out of --sources")
      logging.info("%s: not present, %s rationales are not encoded", path, source)
      continue
    records, skipped = read_rationales(path, data.num_users, skip_bad_lines)
    report["skipped_lines"][source] = skipped
    users = list(range(data.num_users))
    cutoffs = [int(records[u].get("cutoff", len(data.train_prefix(u)))) if u in records
               else 0 for u in users]
    outputs.append(Output(source, [records[u]["response"] if u in records else None
                                   for u in users], users, cutoffs=cutoffs))
    for step in STEPS:
      texts = []
      for u in users:
        steps = records[u]["steps"] if u in records else None
        texts.append(None if steps is None else steps.get(step))
      outputs.append(Output(f"{source}_{step}", texts, users,
                            cutoffs=[c if t is not None else 0 for c, t in zip(cutoffs, texts)]))
  return outputs, report


def _output_files(directory: str, output: Output) -> list[str]:
  files = [os.path.join(directory, f"{output.name}.npy")]
  if not output.first_row_zero:
    files.append(os.path.join(directory, f"{output.name}.present.npy"))
  if output.cutoffs is not None:
    files.append(os.path.join(directory, f"{output.name}.cutoff.npy"))
  return files


def run_stage(workdir: str, encoder: TextEncoder, sources: Sequence[str] | None = None,
              skip_bad_lines: bool = False, progress: bool = True) -> dict:
  """Encodes the workdir's item texts and rationales; returns a summary (see module doc)."""
  outputs, report = plan_outputs(workdir, sources, skip_bad_lines)
  directory = RunLayout(workdir).embeddings
  os.makedirs(directory, exist_ok=True)
  manifest_file = RunLayout(workdir).embeddings_manifest
  old = _read_json(manifest_file) if os.path.exists(manifest_file) else {}
  identity = encoder.identity()
  same_encoder = {k: v for k, v in old.get("encoder", {}).items() if k != "path"} == {
      k: v for k, v in identity.items() if k != "path"}
  cache = EmbeddingCache(os.path.join(directory, "cache", encoder.cache_key()), encoder.dim)
  # Outputs of other sources from earlier runs stay listed (their files stay on disk).
  entries = dict(old.get("outputs", {})) if same_encoder else {}
  summary = {"encoder": identity, "outputs": {}, "skipped_lines": report["skipped_lines"]}
  for output in outputs:
    hashes = output.hashes()
    files = _output_files(directory, output)
    previous = entries.get(output.name)
    if (same_encoder and previous and previous.get("text_sha256") == hashes
        and previous.get("cutoffs") == output.cutoffs and all(os.path.exists(f) for f in files)):
      summary["outputs"][output.name] = {**_counts(previous), "encoded": 0, "written": False}
      continue
    rows = [i for i, t in enumerate(output.texts) if t is not None]
    empty = [output.row_ids[i] for i in rows if not output.texts[i].strip()]
    if empty:
      logging.warning("%s: %d empty texts (ids %s%s) are encoded as the empty string; "
                      "check the inputs", output.name, len(empty), empty[:10],
                      " ..." if len(empty) > 10 else "")
    vectors, stats = encode_cached(encoder, cache, [output.texts[i] for i in rows],
                                   progress=progress, desc=output.name)
    matrix = np.zeros((len(output.texts), encoder.dim), np.float32)
    matrix[rows] = vectors
    present = np.zeros(len(output.texts), bool)
    present[rows] = True
    truncated = encoder.count_truncated([output.texts[i] for i in rows])
    if truncated:
      logging.warning("%s: %d of %d texts are longer than %d tokens and were truncated",
                      output.name, truncated, len(rows), encoder.max_length)
    io.save_npy(files[0], matrix)
    if len(files) > 1:
      io.save_npy(files[1], present)
    if output.cutoffs is not None:
      io.save_npy(files[2], np.asarray(output.cutoffs, np.int32))
    entries[output.name] = {"file": os.path.basename(files[0]), "rows": len(output.texts),
                            "present": len(rows), "truncated": truncated, "empty": len(empty),
                            "text_sha256": hashes, "cutoffs": output.cutoffs}
    summary["outputs"][output.name] = {**_counts(entries[output.name]),
                                       "encoded": stats.texts, "written": True}
    logging.info("%s: %d rows, %d present, %d newly encoded in %.1fs", output.name,
                 len(output.texts), len(rows), stats.texts, stats.seconds)
  io.write_json(manifest_file, {"encoder": identity, "outputs": entries})
  summary["encoded"] = sum(o["encoded"] for o in summary["outputs"].values())
  return summary


def _counts(entry: dict) -> dict:
  return {k: entry[k] for k in ("rows", "present", "truncated", "empty")}

