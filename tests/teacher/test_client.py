"""The teacher client against a fault-injecting server: retries, counts, resumption, key."""

import collections
import logging

import pytest

from slim_jax.teacher import client, prompts, rationales
from teacher_fakes import FaultServer, make_dataset

SECRET = "sk-test-0123456789abcdefSECRETKEY"


def requests_for(num_users=12):
  dataset = make_dataset(num_users=num_users)
  return [(u, prompts.build_messages(dataset, u)) for u in range(num_users)]


def key_of(messages):
  return messages[-1]["content"]


def fast_config(base_url, **kw):
  options = dict(base_url=base_url, model="teacher", timeout=0.5, max_retries=6,
                 concurrency=4, backoff_initial=0.01, backoff_max=0.05, seed=0)
  options.update(kw)
  return client.ClientConfig(**options)


def test_every_user_exactly_once_under_faults(tmp_path):
  requests = requests_for(12)
  scripts = {
      0: ["429", "ok"],
      1: ["500", "500", "ok"],
      2: ["slow", "ok"],
      3: ["malformed", "ok"],
      4: ["drop", "ok"],
      5: ["drop", "500", "429ms", "malformed", "slow", "ok"],
  }
  by_key = {key_of(m): u for u, m in requests}

  def plan(key, attempt):
    script = scripts.get(by_key[key], ["ok"])
    return script[min(attempt, len(script)) - 1]

  out = str(tmp_path / "rationales" / "teacher.jsonl")
  with FaultServer(plan, slow_seconds=1.0) as server:
    stats = client.collect(requests, out, fast_config(server.base_url), SECRET)

  records = rationales.read(out)
  assert sorted(r["user_id"] for r in records) == list(range(12))  # none lost, none twice
  for r in records:
    assert r["messages"] == dict(requests)[r["user_id"]]
    assert r["steps"] is not None and r["model"] == "teacher"
  per_user = {by_key[k]: n for k, n in server.requests_per_key().items()}
  assert per_user == {u: len(scripts.get(u, ["ok"])) for u in range(12)}
  expected_retries = sum(len(s) - 1 for s in scripts.values())
  assert stats.requests == 12 + expected_retries and stats.retries == expected_retries
  assert stats.retries_by_cause == collections.Counter(
      {"429": 2, "5xx": 3, "timeout": 2, "malformed": 2, "connection": 2})
  assert (stats.users_done, stats.users_failed, stats.users_skipped) == (12, 0, 0)
  assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
  # Retry-After: 1 was honoured although the backoff alone would wait <= 0.05 s.
  times = [r.time for r in server.log if by_key[r.key] == 0]
  assert times[1] - times[0] >= 0.95
  # The key went to the server, as a bearer token.
  assert {r.authorization for r in server.log} == {f"Bearer {SECRET}"}


def test_gives_up_after_max_retries_and_a_rerun_asks_only_for_the_failed(tmp_path):
  requests = requests_for(6)
  broken = key_of(requests[2][1])
  healthy = [True]

  def plan(key, attempt):
    return "ok" if key != broken or healthy[0] else "500"

  out = str(tmp_path / "teacher.jsonl")
  healthy[0] = False
  with FaultServer(plan) as server:
    stats = client.collect(requests, out, fast_config(server.base_url, max_retries=2), None)
    assert (stats.users_done, stats.users_failed) == (5, 1)
    assert stats.failures_by_cause == {"5xx": 1}
    assert server.requests_per_key()[broken] == 3
    assert 2 not in rationales.done_users(out)
    healthy[0] = True
    server.log.clear()
    stats = client.collect(requests, out, fast_config(server.base_url), None)
  assert [r.key for r in server.log] == [broken]
  assert (stats.users_done, stats.users_skipped, stats.requests) == (1, 5, 1)
  assert sorted(r["user_id"] for r in rationales.read(out)) == list(range(6))


def test_bad_request_fails_that_user_only_without_retrying(tmp_path):
  requests = requests_for(4)
  bad = key_of(requests[1][1])
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer(lambda key, attempt: "400" if key == bad else "ok") as server:
    stats = client.collect(requests, out, fast_config(server.base_url), None)
  assert server.requests_per_key()[bad] == 1
  assert stats.failures_by_cause == {"http_400": 1} and stats.retries == 0
  assert rationales.done_users(out) == {0, 2, 3}


def test_bad_key_stops_the_run_and_the_error_hides_the_key(tmp_path, caplog):
  requests = requests_for(8)
  out = str(tmp_path / "teacher.jsonl")
  caplog.set_level(logging.DEBUG)
  with FaultServer(lambda key, attempt: "401") as server:
    with pytest.raises(client.FatalError, match="HTTP 401.*check OPENAI_API_KEY") as info:
      client.collect(requests, out, fast_config(server.base_url, concurrency=1), SECRET)
  assert any(SECRET in r.authorization for r in server.log)
  assert SECRET not in str(info.value) and "[REDACTED]" in str(info.value)
  assert SECRET not in caplog.text
  assert rationales.read(out) == []


def test_unparsed_rationales_are_kept_and_counted(tmp_path, monkeypatch):
  import teacher_fakes
  monkeypatch.setattr(teacher_fakes, "rationale_for", lambda key: "Just buy more gadgets.")
  requests = requests_for(3)
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer() as server:
    stats = client.collect(requests, out, fast_config(server.base_url), None)
  records = rationales.read(out)
  assert len(records) == 3 and all(r["steps"] is None for r in records)
  assert all(r["response"] == "Just buy more gadgets." for r in records)
  assert stats.parse_failures == 3


def test_redact_removes_the_key_and_long_fragments():
  assert client.redact(f"bad key {SECRET}!", SECRET) == "bad key [REDACTED]!"
  fragment = SECRET[3:25]
  assert SECRET[3:25] not in client.redact(f"key sk-...{fragment}", SECRET)
  assert client.redact("nothing here", SECRET) == "nothing here"


def test_retry_after_parsing_and_backoff_bounds():
  assert client.parse_retry_after({"retry-after": "3"}) == 3.0
  assert client.parse_retry_after({"retry-after-ms": "250"}) == 0.25
  assert client.parse_retry_after({"retry-after": "soon"}) is None
  import email.utils
  import time
  date = email.utils.formatdate(time.time() + 30, usegmt=True)
  assert 25 < client.parse_retry_after({"retry-after": date}) <= 31
  import random
  config = client.ClientConfig(backoff_initial=1.0, backoff_max=8.0)
  rng = random.Random(0)
  for attempt in range(1, 8):
    delay = client.backoff_delay(attempt, config, rng, None)
    ceiling = min(8.0, 2 ** (attempt - 1))
    assert 0.5 * ceiling <= delay <= ceiling
  assert 5.0 <= client.backoff_delay(1, config, rng, 5.0) <= 5.3
