"""Request and token rate limits and a spending cap for the teacher client.

`RateLimiter` keeps the requests and tokens sent in the last `WINDOW_SECONDS` (a minute)
and makes a request wait until both fit under `requests_per_minute` and
`tokens_per_minute`: a sliding window, so no minute anywhere in the run holds more than
the limits, bursts included. `TokenBudget` is the spending cap: every user's request
reserves an upper bound of its tokens before it is sent, so the run never spends more
than `max_total_tokens`, and the reservation becomes the real count once the answer says
it. A request that does not fit waits while others are in flight (their reservations may
shrink) and is refused once nothing is.

Both use `estimate_tokens`: the prompt's UTF-8 bytes plus a few tokens of chat template per
message (byte-level BPE never makes more tokens than bytes), plus `max_tokens`. It
over-counts most prompts about fourfold; the real count replaces it when the answer comes.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable

WINDOW_SECONDS = 60.0
TEMPLATE_TOKENS_PER_MESSAGE = 8  # role headers and separators of a chat template


def estimate_tokens(messages: list[dict], max_tokens: int) -> int:
  """An upper bound of the prompt's tokens plus the most the answer may take."""
  prompt = sum(len(m["content"].encode("utf-8")) + TEMPLATE_TOKENS_PER_MESSAGE
               for m in messages)
  return prompt + max_tokens


class _Sent:
  """One request in the window: when it was sent and the tokens it counts for."""
  __slots__ = ("time", "tokens")

  def __init__(self, when: float, tokens: int):
    self.time, self.tokens = when, tokens


class RateLimiter:
  """Waits until a request fits under requests_per_minute and tokens_per_minute (0: no
  limit) over the last WINDOW_SECONDS. `clock` and `sleep` are injectable for tests."""

  def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], Awaitable] = asyncio.sleep):
    if requests_per_minute < 0 or tokens_per_minute < 0:
      raise ValueError(f"requests_per_minute and tokens_per_minute must be >= 0 (0: no "
                       f"limit), got {requests_per_minute} and {tokens_per_minute}")
    self.requests_per_minute = requests_per_minute
    self.tokens_per_minute = tokens_per_minute
    self._clock, self._sleep = clock, sleep
    self._sent: collections.deque[_Sent] = collections.deque()
    self._lock = asyncio.Lock()  # first come, first served
    self.waited = 0.0  # seconds spent waiting, summed over requests

  @property
  def active(self) -> bool:
    return bool(self.requests_per_minute or self.tokens_per_minute)

  def check_fits(self, tokens: int) -> None:
    """Raises ValueError when one request alone exceeds the token limit (it would wait
    forever)."""
    if self.tokens_per_minute and tokens > self.tokens_per_minute:
      raise ValueError(f"a request may take {tokens} tokens (prompt bound + max_tokens), more "
                       f"than tokens_per_minute={self.tokens_per_minute}: raise "
                       "--tokens_per_minute or lower --max_tokens")

  def _wait_needed(self, tokens: int, now: float) -> float:
    while self._sent and self._sent[0].time <= now - WINDOW_SECONDS:
      self._sent.popleft()
    wait = 0.0
    if self.requests_per_minute and len(self._sent) >= self.requests_per_minute:
      oldest = self._sent[len(self._sent) - self.requests_per_minute]
      wait = max(wait, oldest.time + WINDOW_SECONDS - now)
    if self.tokens_per_minute:
      excess = sum(s.tokens for s in self._sent) + tokens - self.tokens_per_minute
      for sent in self._sent:  # the window frees its oldest entries first
        if excess <= 0:
          break
        excess -= sent.tokens
        wait = max(wait, sent.time + WINDOW_SECONDS - now)
    return wait

  async def acquire(self, tokens: int) -> _Sent | None:
    """Waits for room, then records the request; returns its entry for `settle`."""
    if not self.active:
      return None
    self.check_fits(tokens)
    async with self._lock:
      while True:
        now = self._clock()
        wait = self._wait_needed(tokens, now)
        if wait <= 0:
          entry = _Sent(now, tokens)
          self._sent.append(entry)
          return entry
        self.waited += wait
        await self._sleep(wait)

  @staticmethod
  def settle(entry: _Sent | None, tokens: int) -> None:
    """The request counts for `tokens` (its real usage; 0 when the server refused it)."""
    if entry is not None:
      entry.tokens = tokens


class CapReached(Exception):
  """The next request would take the run past max_total_tokens."""


class TokenBudget:
  """At most `max_total_tokens` over a run (0: no cap), counted from reservations that
  become real token counts. One budget may span several `collect` calls (the teacher
  stage's kinds); once a request is refused, every later one is too (the run stops)."""

  def __init__(self, max_total_tokens: int = 0):
    if max_total_tokens < 0:
      raise ValueError(f"max_total_tokens must be >= 0 (0: no cap), got {max_total_tokens}")
    self.cap = max_total_tokens
    self.spent = 0  # real tokens of answered requests
    self.reserved = 0  # upper bounds of requests in flight
    self.exhausted = False
    self._changed: asyncio.Condition | None = None

  def start(self) -> None:
    """Binds the budget to the running event loop (each `asyncio.run` has its own)."""
    self._changed = asyncio.Condition()

  async def reserve(self, tokens: int) -> int:
    """Reserves `tokens`, waiting while requests in flight may still free some; raises
    CapReached when the cap would be passed even with nothing in flight."""
    if not self.cap:
      return 0
    async with self._changed:
      while not self.exhausted and self.spent + self.reserved + tokens > self.cap:
        if not self.reserved:
          self.exhausted = True
          break
        await self._changed.wait()
      if self.exhausted:
        raise CapReached(f"{self.spent} of max_total_tokens={self.cap} spent; the next "
                         f"request may take up to {tokens}")
      self.reserved += tokens
    return tokens

  async def settle(self, reserved: int, used: int) -> None:
    """Turns a reservation into `used` real tokens (0 for a request that failed)."""
    if not self.cap:
      self.spent += used
      return
    async with self._changed:
      self.reserved -= reserved
      self.spent += used
      self._changed.notify_all()
