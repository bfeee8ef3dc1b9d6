"""Collects rationales from any OpenAI-compatible chat endpoint, resumably and politely.

`collect` sends one chat completion per user with at most `concurrency` requests in flight,
appends each answer to a JSONL file as soon as it arrives (`rationales.Appender`: one
complete, fsynced line per user) and skips users the file already holds, so a run that dies
loses nothing and a rerun asks only for the users not yet done. `requests_per_minute` and
`tokens_per_minute` hold the request rate under the endpoint's limits, and `max_total_tokens` caps what a run may
spend (`limits.py`): once the next request might pass it, the run stops asking, keeps every
answer so far and counts the users it did not ask (`Stats.users_over_cap`).

Retries are ours, not the `openai` package's (its `max_retries` is 0), so they are counted,
and only what can succeed on a retry is retried: 429 rate limits, 408, 409, timeouts,
dropped connections and malformed bodies (up to `max_retries`), and 5xx answers (up to
`max_server_error_retries`: a deterministic server bug fails the same way every time),
with exponential backoff and full jitter (uniform in [0, ceiling]); a `Retry-After` (or
`retry-after-ms`) header sets the wait instead. A 429 `insufficient_quota`, 400, 401, 403,
404 and 422 stop the run with the server's message (every further request would fail the
same way, or cost money for nothing); any other 4xx fails that user only; an exception of
our own (a bug) stops the run unretried. Failed users are not written, so the next run
asks again. Answers cut by `max_tokens` (`finish_reason: length`) are counted
(`Stats.cut_by_length`) and recorded with their finish reason.

The API key never leaves the client: it is sent only over https or to a loopback address
(unless `allow_insecure_key`), and every message this module logs or raises goes through
`redact`, which removes the key even when an endpoint echoes it back.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Callable, Sequence

import openai

from slim_jax.teacher import limits, rationales

RETRY_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({400, 401, 403, 404, 422})
FATAL_HINTS = {400: "the endpoint rejects the request itself: check --teacher_model, "
                    "--max_tokens and the prompt template",
               401: "check OPENAI_API_KEY", 403: "the key may not have access to this model",
               404: "check --teacher_base_url (it usually ends in /v1) and --teacher_model",
               422: "the endpoint cannot process the request as sent"}
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
NO_KEY = "EMPTY"  # what local servers (vLLM, llama.cpp, ours) accept when no key is set


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Where to send requests and how; the key is passed separately and never stored here."""
  base_url: str | None = None  # None: OpenAI's own endpoint
  model: str = "gpt-3.5-turbo"
  temperature: float = 0.0
  top_p: float = 1.0
  max_tokens: int = 512
  seed: int | None = None  # sent to the endpoint; OpenAI treats it as best effort
  timeout: float = 120.0  # seconds per request
  max_retries: int = 8  # per user, after the first attempt
  max_server_error_retries: int = 3  # per user, of those on a 5xx answer
  concurrency: int = 8
  backoff_initial: float = 1.0  # seconds; doubles per retry, full jitter
  backoff_max: float = 60.0
  max_retry_after: float = 600.0  # longer Retry-After waits are cut to this
  allow_insecure_key: bool = False  # send the key over plain http to a non-loopback host
  requests_per_minute: int = 0  # 0: no limit
  tokens_per_minute: int = 0  # prompt + completion; 0: no limit
  max_total_tokens: int = 0  # spending cap of one run, prompt + completion; 0: no cap

  def __post_init__(self):
    if self.concurrency < 1:
      raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
    if self.max_retries < 0 or self.max_server_error_retries < 0:
      raise ValueError(f"max_retries and max_server_error_retries must be >= 0, got "
                       f"{self.max_retries} and {self.max_server_error_retries}")
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
    if min(self.requests_per_minute, self.tokens_per_minute, self.max_total_tokens) < 0:
      raise ValueError("requests_per_minute, tokens_per_minute and max_total_tokens must be "
                       ">= 0 (0: no limit)")


@dataclasses.dataclass
class Stats:
  """Counts for the summary: HTTP requests, retries by cause, failures and tokens."""
  users_requested: int = 0  # users asked for in this run (after skipping finished ones)
  users_skipped: int = 0  # already in the file
  users_done: int = 0  # written in this run
  users_failed: int = 0  # gave up after retries or a non-retryable error
  users_over_cap: int = 0  # not asked: the next request might have passed max_total_tokens
  requests: int = 0  # HTTP requests sent, retries included
  retries: int = 0
  retries_by_cause: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  failures_by_cause: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  parse_failures: int = 0  # rationales whose steps could not be found (kept, steps=null)
  cut_by_length: int = 0  # answers cut by max_tokens (finish_reason 'length'; kept, marked)
  prompt_tokens: int = 0
  completion_tokens: int = 0
  seconds: float = 0.0
  rate_limit_wait_seconds: float = 0.0  # waited for requests/tokens_per_minute, summed

  def cost(self, price_input: float, price_output: float) -> float:
    """Estimated USD for prices given per million tokens."""
    return (self.prompt_tokens * price_input + self.completion_tokens * price_output) / 1e6

  def merged(self, other: "Stats") -> "Stats":
    """The counts of two runs added (the teacher stage's kinds of rationale)."""
    out = Stats()
    for field in dataclasses.fields(Stats):
      setattr(out, field.name, getattr(self, field.name) + getattr(other, field.name))
    return out

  def as_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["retries_by_cause"] = dict(self.retries_by_cause)
    out["failures_by_cause"] = dict(self.failures_by_cause)
    return out


class FatalError(RuntimeError):
  """An error every further request would hit too (bad key, unknown model or endpoint)."""


class MalformedResponse(ValueError):
  """The endpoint answered 200 with a body that is not a usable chat completion."""


class _Retryable(Exception):
  def __init__(self, cause: str, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.cause = cause
    self.retry_after = retry_after


class _Permanent(Exception):
  def __init__(self, cause: str, message: str):
    super().__init__(message)
    self.cause = cause


def redact(text: str, secret: str | None) -> str:
  """`text` with the secret removed (also its long fragments, as in 'sk-ab...wxyz' echoes)."""
  if not secret or secret == NO_KEY:
    return text
  text = text.replace(secret, "[REDACTED]")
  if len(secret) >= 16:  # an echo of a long middle piece of the key is still a leak
    for size in (len(secret) // 2, 12):
      for start in range(0, len(secret) - size + 1):
        piece = secret[start:start + size]
        if piece in text:
          text = text.replace(piece, "[REDACTED]")
  return text


def parse_retry_after(headers) -> float | None:
  """Seconds from `retry-after-ms`, or `retry-after` as seconds or an HTTP date."""
  if headers is None:
    return None
  value = headers.get("retry-after-ms")
  if value is not None:
    try:
      return max(0.0, float(value) / 1000.0)
    except ValueError:
      pass
  value = headers.get("retry-after")
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, config: ClientConfig, rng: random.Random,
                  retry_after: float | None) -> float:
  """Wait before retry `attempt` (1-based): Retry-After if given, else full-jitter backoff."""
  if retry_after is not None:
    return min(retry_after, config.max_retry_after) + rng.uniform(0, 0.05 * max(retry_after, 0.1))
  ceiling = min(config.backoff_max, config.backoff_initial * 2 ** (attempt - 1))
  return rng.uniform(0.0, ceiling)  # full jitter


def _classify(error: Exception, key: str | None) -> Exception:
  """Maps an exception from one request to _Retryable, _Permanent or FatalError."""
  if isinstance(error, openai.APITimeoutError):  # before APIConnectionError: a subclass
    return _Retryable("timeout", "request timed out")
  if isinstance(error, openai.APIConnectionError):
    return _Retryable("connection", redact(f"connection error: {error}", key))
  if isinstance(error, openai.APIStatusError):
    status = error.status_code
    message = redact(f"HTTP {status}: {getattr(error, 'message', error)}", key)
    if status == 429 and _error_code(error) == "insufficient_quota":
      return FatalError(f"{message} (the account's quota is used up: add credit or use "
                        "another key; retrying would not help)")
    if status in RETRY_STATUS:
      return _Retryable("429" if status == 429 else str(status), message,
                        parse_retry_after(error.response.headers))
    if status >= 500:
      return _Retryable("5xx", message, parse_retry_after(error.response.headers))
    if status in FATAL_STATUS:
      return FatalError(f"{message} ({FATAL_HINTS[status]})")
    return _Permanent(f"http_{status}", message)
  if isinstance(error, (openai.APIResponseValidationError, json.JSONDecodeError,
                        MalformedResponse)):
    return _Retryable("malformed", redact(f"malformed response: {type(error).__name__}: "
                                          f"{error}", key))
  return error  # ours: a bug, raised as it is


def _error_code(error: "openai.APIStatusError") -> str | None:
  """The OpenAI error body's `code` (or `type`), e.g. 'insufficient_quota'."""
  body = getattr(error, "body", None)
  if isinstance(body, dict):
    inner = body.get("error", body)
    if isinstance(inner, dict):
      return inner.get("code") or inner.get("type")
  return getattr(error, "code", None)


def check_key_transport(config: ClientConfig, key: str | None) -> None:
  """Refuses to send a real key in the clear: only https or a loopback address, unless
  `allow_insecure_key`. The message never holds the key."""
  if not key or key == NO_KEY or config.allow_insecure_key or config.base_url is None:
    return
  url = urllib.parse.urlsplit(config.base_url)
  if url.scheme == "https" or (url.hostname or "") in LOOPBACK_HOSTS:
    return
  raise FatalError(f"refusing to send OPENAI_API_KEY to {url.scheme}://{url.hostname}: "
                   "only https or a loopback address get the key. Use https, unset "
                   "OPENAI_API_KEY for a server that needs none, or pass "
                   "--allow_insecure_key if the network is trusted.")


def _unpack(completion) -> tuple[str, str, int | None, int | None, str | None]:
  """(text, model, prompt_tokens, completion_tokens, finish_reason); raises on a bad body."""
  choices = getattr(completion, "choices", None)
  if not choices:
    raise MalformedResponse("the response has no choices")
  choice = choices[0]
  text = getattr(getattr(choice, "message", None), "content", None)
  if not isinstance(text, str):
    raise MalformedResponse("the response's message has no text content")
  usage = getattr(completion, "usage", None)
  prompt_tokens = getattr(usage, "prompt_tokens", None) if usage is not None else None
  completion_tokens = getattr(usage, "completion_tokens", None) if usage is not None else None
  return (text, str(completion.model or ""), prompt_tokens, completion_tokens,
          choice.finish_reason)


async def _request_one(client: openai.AsyncOpenAI, config: ClientConfig, user_id: int,
                       messages: list[dict], stats: Stats, key: str | None,
                       rng: random.Random, limiter: limits.RateLimiter,
                       budget: limits.TokenBudget) -> dict | None:
  """One user's record, retrying; None if it failed for good or was not asked because of
  the spending cap (counted in `stats`). The user's token bound stays reserved in `budget`
  across its retries and becomes its real usage at the end."""
  estimate = limits.estimate_tokens(messages, config.max_tokens)
  try:
    reserved = await budget.reserve(estimate)
  except limits.CapReached:
    stats.users_over_cap += 1
    return None
  used = 0
  try:
    record = await _attempts(client, config, user_id, messages, stats, key, rng, limiter,
                             estimate)
    if record is not None:
      usage = record["usage"]
      known = usage["prompt_tokens"] is not None and usage["completion_tokens"] is not None
      used = usage["prompt_tokens"] + usage["completion_tokens"] if known else estimate
    return record
  finally:
    await budget.settle(reserved, used)


async def _attempts(client: openai.AsyncOpenAI, config: ClientConfig, user_id: int,
                    messages: list[dict], stats: Stats, key: str | None,
                    rng: random.Random, limiter: limits.RateLimiter,
                    estimate: int) -> dict | None:
  """The request and its retries, each attempt under the rate limits."""
  attempt = server_errors = 0
  while True:
    sent = await limiter.acquire(estimate)
    stats.requests += 1
    try:
      try:
        completion = await client.chat.completions.create(
            model=config.model, messages=messages, temperature=config.temperature,
            top_p=config.top_p, max_tokens=config.max_tokens,
            **({"seed": config.seed} if config.seed is not None else {}))
        text, model, prompt_tokens, completion_tokens, finish = _unpack(completion)
      except Exception as e:  # pylint: disable=broad-except
        raise _classify(e, key) from None
      if prompt_tokens is not None and completion_tokens is not None:
        limiter.settle(sent, prompt_tokens + completion_tokens)
    except _Retryable as e:
      attempt += 1
      server_errors += e.cause == "5xx"
      if attempt > config.max_retries or server_errors > config.max_server_error_retries:
        stats.users_failed += 1
        stats.failures_by_cause[e.cause] += 1
        logging.warning("user %d: giving up after %d attempts (last: %s)", user_id, attempt,
                        e)
        return None
      stats.retries += 1
      stats.retries_by_cause[e.cause] += 1
      delay = backoff_delay(attempt, config, rng, e.retry_after)
      logging.info("user %d: %s; retry %d in %.2fs", user_id, e, attempt, delay)
      await asyncio.sleep(delay)
      continue
    except _Permanent as e:
      stats.users_failed += 1
      stats.failures_by_cause[e.cause] += 1
      logging.warning("user %d: %s (not retried)", user_id, e)
      return None
    record = rationales.make_record(
        user_id=user_id, messages=messages, response=text, model=model or config.model,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        finish_reason=finish)
    stats.prompt_tokens += prompt_tokens or 0
    stats.completion_tokens += completion_tokens or 0
    if record["steps"] is None:
      stats.parse_failures += 1
    if finish == "length":
      stats.cut_by_length += 1
    return record


async def _collect(requests: Sequence[tuple[int, list[dict]]], out_path: str,
                   config: ClientConfig, key: str | None, stats: Stats,
                   progress: Callable[[Stats], None] | None,
                   fields: dict[int, dict] | None, limiter: limits.RateLimiter,
                   budget: limits.TokenBudget) -> None:
  client = openai.AsyncOpenAI(api_key=key or NO_KEY, base_url=config.base_url,
                              timeout=config.timeout, max_retries=0)
  semaphore = asyncio.Semaphore(config.concurrency)
  rng = random.Random(config.seed)
  budget.start()

  async def one(user_id: int, messages: list[dict], appender: rationales.Appender):
    async with semaphore:
      record = await _request_one(client, config, user_id, messages, stats, key, rng,
                                  limiter, budget)
    if record is not None:
      appender.append({**record, **(fields or {}).get(user_id, {})})
      stats.users_done += 1
      if progress is not None:
        progress(stats)

  try:
    with rationales.Appender(out_path) as appender:
      async with asyncio.TaskGroup() as group:
        for user_id, messages in requests:
          group.create_task(one(user_id, messages, appender))
  except BaseExceptionGroup as group:  # pylint: disable=broad-except
    fatal = group.subgroup(FatalError)
    first = (fatal or group).exceptions[0]
    while isinstance(first, BaseExceptionGroup):
      first = first.exceptions[0]
    raise first from None
  finally:
    stats.rate_limit_wait_seconds += limiter.waited
    await client.close()


def collect(requests: Sequence[tuple[int, list[dict]]], out_path: str, config: ClientConfig,
            api_key: str | None, progress: Callable[[Stats], None] | None = None,
            fields: dict[int, dict] | None = None,
            budget: limits.TokenBudget | None = None) -> Stats:
  """Asks the endpoint for every (user_id, messages) not yet in `out_path`; returns counts.
  `fields[user_id]` is added to that user's record (the rationale's cutoff). `budget`
  (default: one of `config.max_total_tokens`) may be shared by several calls.

  Users already in the file are skipped. Raises FatalError (key redacted) before any
  request when the key would travel in the clear, and when the endpoint refuses in a way
  every request would repeat (400/401/403/404/422, 429 insufficient_quota); lines written
  before that stay.
  """
  check_key_transport(config, api_key)
  stats = Stats()
  start = time.perf_counter()
  user_ids = [u for u, _ in requests]
  if len(set(user_ids)) != len(user_ids):
    raise ValueError("collect() got the same user_id twice")
  done = rationales.done_users(out_path)
  todo = [(u, m) for u, m in requests if u not in done]
  stats.users_skipped = len(requests) - len(todo)
  stats.users_requested = len(todo)
  budget = budget or limits.TokenBudget(config.max_total_tokens)
  limiter = limits.RateLimiter(config.requests_per_minute, config.tokens_per_minute)
  limiter.check_fits(max((limits.estimate_tokens(m, config.max_tokens) for _, m in todo),
                         default=0))  # before any request, not after the first ones
  if todo:
    asyncio.run(_collect(todo, out_path, config, api_key, stats, progress, fields, limiter,
                         budget))
  stats.seconds = time.perf_counter() - start
  return stats
