"""Distillation examples: teacher rationales -> tokenized, loss-masked, length-bucketed batches.

Each line of the teacher stage's `rationales/teacher.jsonl` holds the chat prompt p'_u
(`messages`) and the teacher's rationale r'_u (`response`). An example is the prompt
rendered by the student tokenizer's chat template with the generation prompt, followed by
the rationale as the assistant turn; the loss mask is 1 on the assistant turn only, so
the loss is `- sum_t log P(r'_t | p', r'_<t)` (DESIGN.md, step 2).

Examples longer than `max_length` lose the end of their rationale; examples whose prompt
leaves fewer than `min_rationale_tokens` are dropped. `TruncationReport` counts both, with
the tokens cut, so a user can choose `--max_length`.

`BucketedBatches` groups examples of similar length (buckets 64, 128, 256, ... up to
`max_length`), pads each batch to its bucket's length (a few shapes, so few compilations),
and gives batch `step` of an endless, deterministic sequence of epochs: the data position
of a run is its step, which makes resuming exact.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from slim_jax.teacher import rationales


@dataclasses.dataclass(frozen=True)
class Example:
  user_id: Any
  input_ids: np.ndarray  # [L] int32: prompt then rationale
  loss_mask: np.ndarray  # [L] bool: True on rationale (assistant) tokens

  @property
  def num_rationale_tokens(self) -> int:
    return int(self.loss_mask.sum())


@dataclasses.dataclass
class TruncationReport:
  """What `build_examples` did to fit `max_length`."""

  max_length: int
  examples_read: int = 0
  examples_kept: int = 0
  examples_truncated: int = 0  # kept, with the end of the rationale cut
  rationale_tokens_cut: int = 0  # over the truncated examples
  examples_dropped: dict[str, int] = dataclasses.field(default_factory=dict)
  tokens_dropped: int = 0  # all tokens of the dropped examples
  rationale_tokens_kept: int = 0
  longest_example: int = 0  # tokens before truncation: the max_length that keeps all

  def drop(self, reason: str, num_tokens: int) -> None:
    self.examples_dropped[reason] = self.examples_dropped.get(reason, 0) + 1
    self.tokens_dropped += num_tokens

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    dropped = sum(self.examples_dropped.values())
    text = (f"{self.examples_kept}/{self.examples_read} examples kept; "
            f"{self.examples_truncated} truncated at max_length={self.max_length} "
            f"({self.rationale_tokens_cut} rationale tokens cut, end of rationale); "
            f"{dropped} dropped {self.examples_dropped or ''} ({self.tokens_dropped} tokens)")
    if self.examples_truncated or dropped:
      text += f"; max_length={self.longest_example} would keep everything"
    return text


def read_teacher_jsonl(path: str) -> list[dict]:
  """The teacher stage's records (`slim_jax.teacher.rationales.read`) in user order; none is
  an error. The teacher stage appends records as its requests finish, so the file's order
  changes from run to run; the held-out split and the batches must not."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run the teacher stage "
                            "(experiments/teacher.py) with this --workdir first")
  records = rationales.read(path)
  if not records:
    raise ValueError(f"{path}: no records; run the teacher stage first")
  return sorted(records, key=lambda record: record["user_id"])


def build_examples(records: Sequence[dict], tokenizer, max_length: int,
                   min_rationale_tokens: int = 8, keep_cut: bool = False
                   ) -> tuple[list[Example], TruncationReport]:
  """Tokenizes (prompt, rationale) pairs with the chat template and masks the prompt.
  Rationales the teacher's max_tokens cut off (`finish_reason: length`) are dropped
  ("cut_by_max_tokens") unless `keep_cut`: the student would learn to stop mid-sentence.

  The prompt ends with the template's generation prompt (`<|im_start|>assistant\\n` for
  SmolLM2); the rationale tokens are what the template renders after it (the response
  and the end-of-turn token), tokenized separately so the mask boundary is exact.
  """
  if max_length < min_rationale_tokens + 1:
    raise ValueError(f"max_length={max_length} leaves no room for a rationale")
  report = TruncationReport(max_length=max_length)
  prompts, completions, kept_records = [], [], []
  for record in records:
    report.examples_read += 1
    response = (record.get("response") or "").strip()
    if not response:
      report.drop("empty_response", 0)
      continue
    if record.get("finish_reason") == "length" and not keep_cut:
      report.drop("cut_by_max_tokens", 0)
      continue
    messages = list(record["messages"])
    prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
      raise ValueError(f"user {record['user_id']}: the chat template does not render the "
                       "assistant turn after the generation prompt; use a tokenizer whose "
                       "template does")
    prompts.append(prompt)
    completions.append(full[len(prompt):])
    kept_records.append(record)
  if not kept_records:
    return [], report
  prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
  completion_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
  examples = []
  for record, p_ids, c_ids in zip(kept_records, prompt_ids, completion_ids):
    total = len(p_ids) + len(c_ids)
    report.longest_example = max(report.longest_example, total)
    room = max_length - len(p_ids)
    if room < min(min_rationale_tokens, len(c_ids)):
      report.drop("prompt_too_long", total)
      continue
    if len(c_ids) > room:
      report.examples_truncated += 1
      report.rationale_tokens_cut += len(c_ids) - room
      c_ids = c_ids[:room]
    ids = np.asarray(list(p_ids) + list(c_ids), np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(p_ids):] = True
    examples.append(Example(record["user_id"], ids, mask))
    report.examples_kept += 1
    report.rationale_tokens_kept += len(c_ids)
  return examples, report


def split_heldout(examples: Sequence[Example], fraction: float, seed: int = 0
                  ) -> tuple[list[Example], list[Example]]:
  """(train, held-out) by a seeded permutation; at least one example on each side."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
  if len(examples) < 2:
    raise ValueError(f"{len(examples)} example(s): need at least 2 to hold one out")
  order = np.random.default_rng(seed).permutation(len(examples))
  n_heldout = min(max(1, round(fraction * len(examples))), len(examples) - 1)
  heldout = sorted(order[:n_heldout].tolist())
  train = sorted(order[n_heldout:].tolist())
  return [examples[i] for i in train], [examples[i] for i in heldout]


def bucket_boundaries(max_length: int, smallest: int = 64) -> tuple[int, ...]:
  """smallest, 2*smallest, ... and finally max_length."""
  out = []
  b = smallest
  while b < max_length:
    out.append(b)
    b *= 2
  out.append(max_length)
  return tuple(out)


class BucketedBatches:
  """Fixed-size batches of similar-length examples, deterministic in (seed, step).

  Every batch has `batch_size` rows, padded on the right to its bucket length. A bucket's
  last, short batch is filled with rows of padding tokens that carry no loss (their
  attention mask is kept at 1 so no query position is left without keys).
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int,
               boundaries: Sequence[int], seed: int = 0, shuffle: bool = True):
    if not examples:
      raise ValueError("no examples to batch")
    self.examples = list(examples)
    self.batch_size = batch_size
    self.pad_id = pad_id
    self.boundaries = tuple(sorted(boundaries))
    self.seed = seed
    self.shuffle = shuffle
    lengths = np.asarray([len(e.input_ids) for e in self.examples])
    if lengths.max() > self.boundaries[-1]:
      raise ValueError(f"an example has {lengths.max()} tokens, more than the largest "
                       f"bucket {self.boundaries[-1]}")
    self._bucket_of = np.searchsorted(self.boundaries, lengths)
    self._epoch_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None
    self.batches_per_epoch = len(self._epoch_plan(0))

  def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """[(bucket length, example indices)] for one epoch, in the order they are served."""
    if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
      return self._epoch_cache[1]
    rng = np.random.default_rng([self.seed, epoch])
    plan = []
    for bucket, length in enumerate(self.boundaries):
      idx = np.flatnonzero(self._bucket_of == bucket)
      if self.shuffle:
        idx = rng.permutation(idx)
      for start in range(0, len(idx), self.batch_size):
        plan.append((length, idx[start:start + self.batch_size]))
    if self.shuffle:
      plan = [plan[i] for i in rng.permutation(len(plan))]
    self._epoch_cache = (epoch, plan)
    return plan

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at global position `step` (epoch = step // batches_per_epoch)."""
    epoch, index = divmod(step, self.batches_per_epoch)
    length, idx = self._epoch_plan(epoch)[index]
    return self._collate(length, idx)

  def epoch(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over every example (evaluation)."""
    for length, idx in self._epoch_plan(0):
      yield self._collate(length, idx)

  def _collate(self, length: int, idx: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.full((self.batch_size, length), self.pad_id, np.int32)  # [B, L]
    attention = np.ones((self.batch_size, length), np.int32)  # [B, L]
    loss_mask = np.zeros((self.batch_size, length), np.float32)  # [B, L]
    for row, i in enumerate(idx):
      ex = self.examples[i]
      n = len(ex.input_ids)
      ids[row, :n] = ex.input_ids
      attention[row, n:] = 0
      loss_mask[row, :n] = ex.loss_mask
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
