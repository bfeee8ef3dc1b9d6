"""The rationale JSONL: schema, fsynced appends, torn-line recovery, dedupe."""

import json
import multiprocessing
import os
import signal
import threading

import pytest

from slim_jax.teacher import rationales


def record(user_id, response="Step 1: a\nStep 2: b\nStep 3: c"):
  return rationales.make_record(
      user_id=user_id, messages=[{"role": "user", "content": f"history of {user_id}"}],
      response=response, model="m", prompt_tokens=10, completion_tokens=5,
      finish_reason="stop")


def test_record_schema_and_parse_failure_kept():
  good = record(3)
  assert set(rationales.REQUIRED_KEYS) <= set(good)
  assert good["steps"] == {"step1": "a", "step2": "b", "step3": "c"}
  assert good["usage"] == {"prompt_tokens": 10, "completion_tokens": 5}
  bad = record(4, response="no structure at all")
  assert bad["steps"] is None and bad["response"] == "no structure at all"


def test_append_read_roundtrip_and_done_users(tmp_path):
  path = str(tmp_path / "r" / "teacher.jsonl")
  with rationales.Appender(path) as out:
    for u in (0, 5, 2):
      out.append(record(u))
  assert [r["user_id"] for r in rationales.read(path)] == [0, 5, 2]
  assert rationales.done_users(path) == {0, 2, 5}
  with open(path, encoding="utf-8") as f:
    assert all(line.endswith("\n") and json.loads(line) for line in f)


def test_concurrent_appends_never_interleave(tmp_path):
  path = str(tmp_path / "teacher.jsonl")
  long_text = "Step 1: " + "x" * 20000 + "\nStep 2: y\nStep 3: z"
  with rationales.Appender(path) as out:
    threads = [threading.Thread(target=lambda u=u: out.append(record(u, long_text)))
               for u in range(16)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert sorted(r["user_id"] for r in rationales.read(path)) == list(range(16))


def _append_forever(path):
  with rationales.Appender(path) as out:
    u = 0
    while True:
      out.append(record(u, "Step 1: " + "x" * 50000 + "\nStep 2: y"))
      u += 1


def test_killed_writer_leaves_only_complete_lines(tmp_path):
  path = str(tmp_path / "teacher.jsonl")
  process = multiprocessing.get_context("spawn").Process(target=_append_forever, args=(path,))
  process.start()
  while not os.path.exists(path) or os.path.getsize(path) < 500_000:
    assert process.is_alive(), "the writer died on its own"
    process.join(0.01)
  os.kill(process.pid, signal.SIGKILL)
  process.join()
  users = [r["user_id"] for r in rationales.read(path)]
  assert users == list(range(len(users))) and len(users) >= 5


def test_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path):
  path = str(tmp_path / "teacher.jsonl")
  with rationales.Appender(path) as out:
    out.append(record(0))
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"user_id": 1, "messages": [')  # a crash mid-line
  assert [r["user_id"] for r in rationales.read(path)] == [0]
  with rationales.Appender(path) as out:
    out.append(record(1))
  assert [r["user_id"] for r in rationales.read(path)] == [0, 1]


def test_malformed_middle_line_names_file_and_line(tmp_path):
  path = tmp_path / "teacher.jsonl"
  path.write_text(json.dumps(record(0)) + "\nnot json\n" + json.dumps(record(1)) + "\n")
  with pytest.raises(ValueError, match=r"teacher.jsonl:2: malformed"):
    rationales.read(str(path))
  missing = dict(record(2))
  del missing["steps"]
  path.write_text(json.dumps(missing) + "\n")
  with pytest.raises(ValueError, match=r":1: .*missing keys \['steps'\]"):
    rationales.read(str(path))


def test_dedupe_keeps_the_first_line_of_each_user(tmp_path):
  path = str(tmp_path / "teacher.jsonl")
  with rationales.Appender(path) as out:
    out.append(record(0, "Step 1: first\nStep 2: b"))
    out.append(record(1))
    out.append(record(0, "Step 1: second\nStep 2: b"))
  assert rationales.dedupe(path) == 1
  records = rationales.read(path)
  assert [r["user_id"] for r in records] == [0, 1]
  assert records[0]["steps"]["step1"] == "first"
  assert rationales.dedupe(path) == 0


def test_append_rejects_incomplete_records(tmp_path):
  with rationales.Appender(str(tmp_path / "t.jsonl")) as out:
    with pytest.raises(ValueError, match="missing keys"):
      out.append({"user_id": 0})
