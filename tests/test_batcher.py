"""slim_jax/batcher.py: jobs that arrive together share a batch; limits are enforced."""

import time

import pytest

from slim_jax import batcher
from test_serve import FakeGenerator, FakeSampling


def test_requests_that_trickle_in_within_a_window_of_each_other_share_one_batch():
  # 60 requests 10 ms apart with a 50 ms window: about 600 ms from first to last, twelve
  # windows, yet each arrives well before the window since the previous one closes.
  generator = FakeGenerator()
  engine = batcher.Batcher(generator, max_batch_size=64, window_s=0.05)
  jobs = []
  for i in range(60):
    jobs.append(engine.submit(batcher.Job([[{"role": "user", "content": f"user {i}"}]],
                                         [FakeSampling(max_new_tokens=2)], None)))
    time.sleep(0.015)
  for job in jobs:
    assert job.done.wait(10) and job.error is None
  engine.stop()
  assert generator.batch_sizes == [60]


def test_a_job_over_the_batch_size_and_a_stopped_batcher_are_refused():
  engine = batcher.Batcher(FakeGenerator(), max_batch_size=2, window_s=0.01)
  rows = [[{"role": "user", "content": "hi"}]] * 3
  with pytest.raises(batcher.TooManyRows, match="n=3"):
    engine.submit(batcher.Job(rows, [FakeSampling(max_new_tokens=1)] * 3, None))
  engine.stop()
  with pytest.raises(batcher.Stopping):
    engine.submit(batcher.Job(rows[:1], [FakeSampling(max_new_tokens=1)], None))
