"""Test doubles for the chat server: a generator that decodes a fixed word sequence in
lock step, fails on a poisoned conversation and rejects a marked one in its chat template."""

from __future__ import annotations

import dataclasses
import time

import jinja2

from slim_jax import generate

POISON = "POISON-ROW"  # a conversation the fake generator fails to decode
BAD_TEMPLATE = "BAD-TEMPLATE"  # a conversation its chat template rejects


@dataclasses.dataclass(frozen=True)
class FakeSampling:
  max_new_tokens: int = 256
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int = 0


@dataclasses.dataclass
class FakeCompletion:
  text: str
  token_ids: list[int]
  prompt_tokens: int
  completion_tokens: int
  finish_reason: str


class FakeTokenizer:
  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": list(range(len(text.split())))}


class FakeGenerator:
  """Answers with a fixed word sequence, one word per decode step of `step_seconds`.

  Like the real generator it decodes a whole batch in lock step, so a batch of 16 costs
  about as much as a batch of 1.
  """
  WORDS = "Step 1: likes RPGs. Step 2: Nintendo. Step 3: Zelda STOP and then more words".split()

  def __init__(self, step_seconds=0.002, words=None):
    self.tokenizer = FakeTokenizer()
    self.step_seconds = step_seconds
    if words is not None:
      self.WORDS = words
    self.batch_sizes = []
    self.steps_run = []  # decode steps of each batch
    self.sampling_seen = []

  def render_chat(self, messages):
    if any(BAD_TEMPLATE in m["content"] for m in messages):
      raise jinja2.exceptions.TemplateError("Conversation roles must alternate")
    return " ".join(m["content"] for m in messages)

  def chat_ids(self, messages):
    return self.tokenizer(self.render_chat(messages), add_special_tokens=False)["input_ids"]

  def chat(self, conversations, sampling=FakeSampling(), callback=None, should_stop=None):
    rows = len(conversations)
    if any(POISON in m["content"] for c in conversations for m in c):
      raise RuntimeError("cannot decode this row")
    self.batch_sizes.append(rows)
    sampling = sampling if isinstance(sampling, list) else [sampling] * rows
    self.sampling_seen.extend(sampling)
    texts, finished, reasons = [""] * rows, [False] * rows, ["length"] * rows
    counts, streamed = [0] * rows, [0] * rows
    steps = 0
    for step in range(max(s.max_new_tokens for s in sampling)):
      if all(finished):
        break
      steps += 1
      time.sleep(self.step_seconds)
      for row, params in enumerate(sampling):
        if not finished[row] and should_stop is not None and should_stop(row):
          finished[row], reasons[row] = True, "cancelled"
        if finished[row] or step >= params.max_new_tokens:
          finished[row] = True
          continue
        if step >= len(self.WORDS):
          finished[row], reasons[row] = True, "stop"
          continue
        piece = ("" if step == 0 else " ") + self.WORDS[step]
        candidate = texts[row] + piece
        hit = [candidate.find(s) for s in params.stop if s in candidate]
        counts[row] += 1
        if hit:  # the final text ends before the stop sequence, even if part was emitted
          texts[row] = candidate[:min(hit)]
          finished[row], reasons[row] = True, "stop"
          continue
        texts[row] += piece
        end = max(streamed[row], generate.streamable_end(texts[row], params.stop))
        if callback is not None and end > streamed[row]:  # the real generator's holdback
          callback(row, texts[row][streamed[row]:end])
          streamed[row] = end
    self.steps_run.append(steps)
    prompt = [len(self.render_chat(c).split()) for c in conversations]
    return [FakeCompletion(t, list(range(n)), p, n, r)
            for t, n, p, r in zip(texts, counts, prompt, reasons)]


FULL_TEXT = " ".join(FakeGenerator.WORDS)
