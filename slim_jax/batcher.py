"""The batching engine of the server (slim_jax/serve.py): HTTP handler threads submit the
rows of their requests as `Job`s; one thread gathers the jobs that arrive together into a
batch and runs it through the generator (slim_jax/generate.py) in lock step, streaming
text back through each job's `on_text`. A failed batch fails its own jobs only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

MAX_GATHER_S = 1.0  # a gathering batch waits at most this long for company,
MAX_WINDOWS = 10  # ... or this many batch windows when they are longer


class TooManyRows(ValueError):
  """A job has more rows than a batch holds."""


class Stopping(RuntimeError):
  """The batcher takes no more jobs."""


@dataclasses.dataclass
class Job:
  """One request's rows, waiting for the batcher; `events` feeds a streaming handler."""
  conversations: list[list[dict]]
  sampling: list  # one generate.SamplingParams per row
  on_text: Callable[[int, str], None] | None  # (choice index, new text), from the batcher
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  completions: list | None = None
  error: BaseException | None = None


class Batcher:
  """Owns the generator; runs the rows of requests that arrive together as one batch."""

  def __init__(self, generator, max_batch_size: int, window_s: float):
    self.generator = generator
    self.max_batch_size = max_batch_size
    self.window_s = window_s
    self.max_gather_s = max(MAX_GATHER_S, MAX_WINDOWS * window_s)
    self._queue: queue.Queue = queue.Queue()
    self._stopping = False
    self._held: Job | None = None  # did not fit the last batch
    self._arriving = 0  # requests read and parsed by handlers, not yet submitted
    self._arriving_lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
    self.batches = 0
    self.rows = 0
    self.largest_batch = 0
    self._thread.start()

  def submit(self, job: Job) -> Job:
    if len(job.conversations) > self.max_batch_size:
      raise TooManyRows(f"n={len(job.conversations)} is more than this server's batch size "
                        f"{self.max_batch_size}")
    if self._stopping:
      raise Stopping("the batcher is stopping")
    self._queue.put(job)
    return job

  @contextlib.contextmanager
  def arriving(self):
    """Wraps a handler's parsing and `submit`: a gathering batch waits for such requests."""
    with self._arriving_lock:
      self._arriving += 1
    try:
      yield
    finally:
      with self._arriving_lock:
        self._arriving -= 1

  def stop(self) -> None:
    self._stopping = True
    self._queue.put(None)
    self._thread.join()

  def _next_batch(self) -> list[Job] | None:
    first = self._held or self._queue.get()
    self._held = None
    if first is None:
      return None
    jobs, rows = [first], len(first.conversations)
    # Keep gathering while requests keep coming: each arrival extends the wait by one window,
    # up to max_gather_s in all. A burst of clients whose requests trickle in (threads parse and
    # tokenize under the GIL, slowly on a loaded machine) then shares one batch instead of
    # splitting, where the late rows wait for the whole first batch to finish.
    start = time.monotonic()
    deadline = start + self.window_s
    while rows < self.max_batch_size:
      try:
        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        # Handlers still parsing requests (16 clients' chat templates under the GIL take a
        # while on a loaded machine): wait for them rather than leave them to the next batch.
        if self._arriving and time.monotonic() < start + self.max_gather_s:
          deadline = time.monotonic() + self.window_s
          continue
        break
      deadline = min(start + self.max_gather_s, time.monotonic() + self.window_s)
      if job is None:
        self._queue.put(None)  # stop after this batch
        break
      if rows + len(job.conversations) > self.max_batch_size:
        self._held = job
        break
      jobs.append(job)
      rows += len(job.conversations)
    return jobs

  def _run(self) -> None:
    while True:
      jobs = self._next_batch()
      if jobs is None:
        return
      conversations, sampling, owners = [], [], []
      for job in jobs:
        for index, (conversation, params) in enumerate(zip(job.conversations, job.sampling)):
          conversations.append(conversation)
          sampling.append(params)
          owners.append((job, index))

      def callback(row: int, text: str) -> None:
        job, index = owners[row]
        if job.on_text is not None and text:
          job.on_text(index, text)

      try:
        completions = self.generator.chat(conversations, sampling=sampling, callback=callback)
        self.batches += 1
        self.rows += len(conversations)
        self.largest_batch = max(self.largest_batch, len(conversations))
        start = 0
        for job in jobs:
          job.completions = completions[start:start + len(job.conversations)]
          start += len(job.conversations)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("generation failed for a batch of %d rows", len(conversations))
        for job in jobs:
          job.error = e
      for job in jobs:
        job.done.set()
