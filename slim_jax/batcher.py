"""The batching engine of the server (slim_jax/serve.py): HTTP handler threads submit the
rows of their requests as `Job`s; one thread gathers the jobs that arrive together into a
batch and runs it through the generator (slim_jax/generate.py) in lock step, streaming
text back through each job's `on_text`. When a batch fails, each of its jobs that has not
streamed anything yet runs again alone, so a row that cannot be decoded fails its own
request and the rest complete. A job whose client went away (`cancelled`) stops its rows at
the next decode chunk. At most `max_queued_rows` rows wait at once (`QueueFull` beyond).
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


class QueueFull(RuntimeError):
  """As many rows as the queue holds are already waiting."""


@dataclasses.dataclass
class Job:
  """One request's rows, waiting for the batcher; `events` feeds a streaming handler."""
  conversations: list[list[dict]]
  sampling: list  # one generate.SamplingParams per row
  on_text: Callable[[int, str], None] | None  # (choice index, new text), from the batcher
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  completions: list | None = None
  error: BaseException | None = None
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  streamed: bool = False  # some text already went to `on_text`


class Batcher:
  """Owns the generator; runs the rows of requests that arrive together as one batch."""

  def __init__(self, generator, max_batch_size: int, window_s: float,
               max_queued_rows: int = 1 << 30):
    self.generator = generator
    self.max_batch_size = max_batch_size
    self.max_queued_rows = max_queued_rows
    self._queued_rows = 0  # submitted, not yet taken into a batch
    self._queued_lock = threading.Lock()
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
    with self._queued_lock:
      if self._queued_rows + len(job.conversations) > self.max_queued_rows:
        raise QueueFull(f"{self._queued_rows} rows are already waiting (the queue holds "
                        f"{self.max_queued_rows})")
      self._queued_rows += len(job.conversations)
    self._queue.put(job)
    return job

  @property
  def queued_rows(self) -> int:
    return self._queued_rows

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

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

  def _get(self, timeout: float | None = None) -> Job | None:
    job = self._queue.get(timeout=timeout)
    if job is not None:
      with self._queued_lock:
        self._queued_rows -= len(job.conversations)
    return job

  def _next_batch(self) -> list[Job] | None:
    first = self._held or self._get()
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
        job = self._get(timeout=max(0.0, deadline - time.monotonic()))
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
      jobs = [job for job in jobs if not self._drop_cancelled(job)]
      if not jobs:
        continue
      try:
        self._decode(jobs)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("generation failed for a batch of %d requests", len(jobs))
        if len(jobs) == 1:
          jobs[0].error = e
        else:  # find the failing rows: each job that streamed nothing yet runs alone
          for job in jobs:
            if job.streamed:
              job.error = e
              continue
            try:
              self._decode([job])
            except Exception as alone:  # pylint: disable=broad-except
              job.error = alone
      for job in jobs:
        job.done.set()

  @staticmethod
  def _drop_cancelled(job: Job) -> bool:
    if job.cancelled.is_set():
      job.error = Stopping("the client went away")
      job.done.set()
      return True
    return False

  def _decode(self, jobs: list[Job]) -> None:
    """Runs the jobs' rows as one batch and gives each job its completions."""
    conversations, sampling, owners = [], [], []
    for job in jobs:
      for index, (conversation, params) in enumerate(zip(job.conversations, job.sampling)):
        conversations.append(conversation)
        sampling.append(params)
        owners.append((job, index))

    def callback(row: int, text: str) -> None:
      job, index = owners[row]
      if job.on_text is not None and text:
        job.streamed = True
        job.on_text(index, text)

    completions = self.generator.chat(
        conversations, sampling=sampling, callback=callback,
        should_stop=lambda row: owners[row][0].cancelled.is_set())
    self.batches += 1
    self.rows += len(conversations)
    self.largest_batch = max(self.largest_batch, len(conversations))
    start = 0
    for job in jobs:
      job.completions = completions[start:start + len(job.conversations)]
      start += len(job.conversations)
