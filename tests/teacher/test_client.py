"""The teacher client against a fault-injecting server: retries, counts, resumption, key."""

import collections
import logging

import pytest

from slim_jax.teacher import client, limits, prompts, rationales
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


@pytest.mark.parametrize("action,message", [
    ("400", "HTTP 400: .*context too long"),
    ("quota", "HTTP 429: .*You exceeded your current quota.*quota is used up")])
def test_requests_that_cannot_succeed_stop_the_run_unretried(tmp_path, action, message):
  requests = requests_for(4)
  bad = key_of(requests[1][1])
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer(lambda key, attempt: action if key == bad else "ok") as server:
    with pytest.raises(client.FatalError, match=message):
      client.collect(requests, out, fast_config(server.base_url, concurrency=1), None)
  assert server.requests_per_key()[bad] == 1  # never retried
  assert rationales.done_users(out) == {0}  # what came before stays


def test_server_errors_are_retried_a_bounded_number_of_times(tmp_path):
  requests = requests_for(2)
  broken = key_of(requests[0][1])
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer(lambda key, attempt: "500" if key == broken else "ok") as server:
    config = fast_config(server.base_url, max_retries=6, max_server_error_retries=2)
    stats = client.collect(requests, out, config, None)
  assert server.requests_per_key()[broken] == 3  # the first try and 2 retries, not 7
  assert stats.failures_by_cause == {"5xx": 1} and rationales.done_users(out) == {1}


def test_our_own_bugs_are_not_retried(tmp_path, monkeypatch):
  def broken_unpack(completion):
    raise TypeError("a bug in our code")
  monkeypatch.setattr(client, "_unpack", broken_unpack)
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer() as server:
    with pytest.raises(TypeError, match="a bug in our code"):
      client.collect(requests_for(1), out, fast_config(server.base_url), None)
  assert len(server.log) == 1


def test_answers_cut_by_max_tokens_are_counted_and_marked(tmp_path):
  requests = requests_for(3)
  cut = key_of(requests[2][1])
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer(lambda key, attempt: "cut" if key == cut else "ok") as server:
    stats = client.collect(requests, out, fast_config(server.base_url), None)
  assert stats.cut_by_length == 1 and stats.as_dict()["cut_by_length"] == 1
  by_user = rationales.by_user(rationales.read(out))
  assert [by_user[u]["finish_reason"] for u in range(3)] == ["stop", "stop", "length"]


def test_requests_per_minute_is_honoured_against_a_server(tmp_path, monkeypatch):
  monkeypatch.setattr(limits, "WINDOW_SECONDS", 1.0)  # a "minute" of one second
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer(lambda key, attempt: "429" if attempt == 1 and key.endswith("0") else "ok"
                   ) as server:
    stats = client.collect(requests_for(10), out, fast_config(
        server.base_url, requests_per_minute=4, concurrency=8), None)
  times = sorted(r.time for r in server.log)
  assert stats.users_done == 10 and len(times) == stats.requests
  # Sent at most 4 per window; arrivals may lag their sending by a few milliseconds.
  assert max(sum(t <= t2 < t + 0.9 for t2 in times) for t in times) <= 4
  assert times[-1] - times[0] >= (len(times) - 1) // 4 - 0.1
  assert stats.rate_limit_wait_seconds > 0


def test_a_request_over_the_token_limit_is_refused_before_sending(tmp_path):
  with FaultServer() as server:
    with pytest.raises(ValueError, match="tokens_per_minute=100"):
      client.collect(requests_for(2), str(tmp_path / "t.jsonl"),
                     fast_config(server.base_url, tokens_per_minute=100), None)
  assert server.log == []


def test_the_spending_cap_stops_cleanly_and_a_rerun_continues(tmp_path):
  requests = requests_for(12)
  cap = 2 * max(limits.estimate_tokens(m, 64) for _, m in requests)
  out = str(tmp_path / "teacher.jsonl")
  with FaultServer() as server:
    stats = client.collect(requests, out, fast_config(
        server.base_url, max_tokens=64, max_total_tokens=cap, concurrency=3), None)
  kept = rationales.by_user(rationales.read(out))
  assert 0 < stats.users_done < 12 and stats.users_done + stats.users_over_cap == 12
  assert stats.prompt_tokens + stats.completion_tokens <= cap
  assert len(server.log) == stats.requests == len(kept) == stats.users_done
  with FaultServer() as server:  # no cap: only the users not asked before
    rest = client.collect(requests, out, fast_config(server.base_url, max_tokens=64), None)
  assert rest.users_skipped == len(kept) and rest.users_done == 12 - len(kept)
  by_key = {key_of(m): u for u, m in requests}
  assert not {by_key[r.key] for r in server.log} & set(kept)
  assert sorted(r["user_id"] for r in rationales.read(out)) == list(range(12))


@pytest.mark.parametrize("url,allowed", [
    ("http://teacher.example.com/v1", False), ("http://10.0.0.5:8000/v1", False),
    ("https://teacher.example.com/v1", True), ("http://127.0.0.1:9/v1", True),
    ("http://localhost:9/v1", True)])
def test_the_key_travels_only_over_https_or_to_loopback(url, allowed):
  config = client.ClientConfig(base_url=url)
  if allowed:
    client.check_key_transport(config, SECRET)
  else:
    with pytest.raises(client.FatalError, match="allow_insecure_key") as info:
      client.check_key_transport(config, SECRET)
    assert SECRET not in str(info.value)
    client.check_key_transport(client.ClientConfig(base_url=url, allow_insecure_key=True),
                               SECRET)
  client.check_key_transport(config, None)  # no key: nothing to protect


def test_an_insecure_key_is_refused_before_any_request(tmp_path):
  with FaultServer() as server:
    url = server.base_url.replace("127.0.0.1", "0.0.0.0")  # not loopback by name
    with pytest.raises(client.FatalError, match="refusing to send"):
      client.collect(requests_for(2), str(tmp_path / "t.jsonl"), fast_config(url), SECRET)
  assert server.log == []


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
    assert 0.0 <= delay <= ceiling
  # Full jitter: the waits spread over the whole [0, ceiling], not only its upper half.
  waits = [client.backoff_delay(4, config, rng, None) for _ in range(200)]
  assert min(waits) < 0.25 * 8.0 and max(waits) > 0.75 * 8.0
  assert 5.0 <= client.backoff_delay(1, config, rng, 5.0) <= 5.3
