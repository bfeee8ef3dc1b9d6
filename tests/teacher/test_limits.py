"""The rate limiter and the spending cap on a fake clock: no minute holds more than the
limits, a refund lets the next request in sooner, the cap waits for requests in flight and
then stops everything."""

import asyncio

import pytest

from slim_jax.teacher import limits


class FakeTime:
  """A clock that moves only when someone sleeps on it."""

  def __init__(self):
    self.now = 0.0

  def clock(self) -> float:
    return self.now

  async def sleep(self, seconds: float) -> None:
    self.now += seconds
    await asyncio.sleep(0)


def most_in_any_window(times, weights=None, window=limits.WINDOW_SECONDS):
  weights = weights or [1] * len(times)
  return max(sum(w for t2, w in zip(times, weights) if t <= t2 < t + window) for t in times)


def send_all(limiter, fake, tokens):
  """Acquires for every request concurrently; returns the send times in order."""
  times = []

  async def one(amount):
    await limiter.acquire(amount)
    times.append(fake.now)

  async def main():
    await asyncio.gather(*(one(t) for t in tokens))
  asyncio.run(main())
  return times


def test_requests_per_minute_holds_in_every_window():
  fake = FakeTime()
  limiter = limits.RateLimiter(requests_per_minute=3, clock=fake.clock, sleep=fake.sleep)
  times = send_all(limiter, fake, [1] * 10)
  assert most_in_any_window(times) == 3
  assert times == [0, 0, 0, 60, 60, 60, 120, 120, 120, 180]
  assert limiter.waited > 0


def test_tokens_per_minute_holds_in_every_window():
  fake = FakeTime()
  limiter = limits.RateLimiter(tokens_per_minute=100, clock=fake.clock, sleep=fake.sleep)
  amounts = [40, 40, 40, 70, 10, 30]
  times = send_all(limiter, fake, amounts)
  assert most_in_any_window(times, amounts) <= 100
  assert times[:3] == [0, 0, 60]  # the third 40 waits until the first two leave the window
  with pytest.raises(ValueError, match="tokens_per_minute=100"):
    limiter.check_fits(101)


def test_a_settled_request_frees_its_unused_tokens():
  fake = FakeTime()
  limiter = limits.RateLimiter(tokens_per_minute=100, clock=fake.clock, sleep=fake.sleep)

  async def main():
    first = await limiter.acquire(90)
    limiter.settle(first, 20)  # the answer was shorter than its bound
    await limiter.acquire(80)
    return fake.now
  assert asyncio.run(main()) == 0


def test_no_limits_never_wait():
  fake = FakeTime()
  limiter = limits.RateLimiter(clock=fake.clock, sleep=fake.sleep)
  assert send_all(limiter, fake, [10 ** 9] * 5) == [0] * 5


def test_the_cap_waits_for_requests_in_flight_then_stops_everything():
  budget = limits.TokenBudget(max_total_tokens=100)
  order = []

  async def main():
    budget.start()
    first = await budget.reserve(60)

    async def second():
      await budget.reserve(60)  # fits only once the first turns out smaller
      order.append("second reserved")
    task = asyncio.create_task(second())
    await asyncio.sleep(0)
    order.append("first settles")
    await budget.settle(first, 30)
    await task
    await budget.settle(60, 50)  # spent 80
    with pytest.raises(limits.CapReached, match="80 of max_total_tokens=100"):
      await budget.reserve(30)
    with pytest.raises(limits.CapReached):  # once stopped, even a small one is refused
      await budget.reserve(1)
  asyncio.run(main())
  assert order == ["first settles", "second reserved"]
  assert budget.spent == 80 and budget.reserved == 0


def test_no_cap_counts_but_never_refuses():
  budget = limits.TokenBudget(0)

  async def main():
    budget.start()
    for _ in range(3):
      await budget.settle(await budget.reserve(10 ** 9), 10 ** 9)
  asyncio.run(main())
  assert budget.spent == 3 * 10 ** 9


def test_estimate_bounds_a_byte_level_tokenizer():
  messages = [{"role": "system", "content": "héllo"}, {"role": "user", "content": "abc"}]
  assert limits.estimate_tokens(messages, 50) == 6 + 3 + 2 * 8 + 50
  with pytest.raises(ValueError, match=">= 0"):
    limits.RateLimiter(requests_per_minute=-1)
  with pytest.raises(ValueError, match=">= 0"):
    limits.TokenBudget(-5)
