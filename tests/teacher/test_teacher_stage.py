"""experiments/teacher.py as a user runs it: a real process, killed and restarted, the key
kept out of every file and output, the leakage guarantee on real prepared data."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from slim_jax.data import prepare
from slim_jax.pipeline.layout import RunLayout
from slim_jax.teacher import prompts, rationales
from teacher_fakes import FaultServer

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "teacher.py"
SECRET = "sk-proj-TESTSECRET-7f3a9c2e51b84d06aa19"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A prepared synthetic dataset (400 users), shared by the tests in this file."""
  path = tmp_path_factory.mktemp("teacher_stage")
  prepare.prepare_or_load("synthetic", None, str(path))
  return path


def fresh_workdir(workdir, tmp_path):
  """A run folder holding only the prepared data (each test writes its own rationales)."""
  run = tmp_path / "run"
  run.mkdir()
  os.symlink(workdir / "data", run / "data")
  os.symlink(workdir / "raw", run / "raw")
  return run


def key_of_user(workdir) -> dict:
  """user -> the user message of its prompt (what the fake server logs as the key)."""
  dataset = prepare.prepare_or_load("synthetic", None, str(workdir))
  return {u: prompts.build_messages(dataset, u)[-1]["content"] for u in range(dataset.num_users)}


def run_stage(run, base_url, *flags, key=None, wait=True, **popen):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("OPENAI_API_KEY", None)
  if key is not None:
    env["OPENAI_API_KEY"] = key
  command = [sys.executable, str(SCRIPT), "--dataset=synthetic", f"--workdir={run}",
             f"--teacher_base_url={base_url}", "--teacher_model=teacher",
             "--backoff_initial=0.01", "--backoff_max=0.05", *flags]
  if not wait:
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
  return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=120, **popen)


def lines(run) -> list[dict]:
  return rationales.read(str(run / "rationales" / "teacher.jsonl"))


def test_killed_run_restarts_with_only_unfinished_users(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  key = key_of_user(workdir)
  out = run / "rationales" / "teacher.jsonl"
  with FaultServer(lambda key, attempt: "slow", slow_seconds=0.15) as server:
    process = run_stage(run, server.base_url, "--kinds=eval", "--num_users=40",
                        "--concurrency=2", "--seed=3", wait=False)
    deadline = time.monotonic() + 90
    while not (out.exists() and len(lines(run)) >= 8):
      assert process.poll() is None, process.communicate()
      assert time.monotonic() < deadline
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
  done = [r["user_id"] for r in lines(run)]
  assert 8 <= len(done) < 40 and len(set(done)) == len(done)

  with FaultServer() as server:
    result = run_stage(run, server.base_url, "--kinds=eval", "--num_users=40",
                       "--concurrency=2", "--seed=3")
    assert result.returncode == 0, result.stderr
    second_requests = sorted(r.key for r in server.log)
  final = [r["user_id"] for r in lines(run)]
  assert len(final) == len(set(final)) == 40 and final[:len(done)] == done
  # The restart asked once for each unfinished user, and never for a finished one (the
  # server sees prompts, not ids: compare the prompts).
  assert second_requests == sorted(key[u] for u in set(final) - set(done))
  assert f"{40 - len(done)} written, {len(done)} already done" in result.stdout
  summary = json.loads((run / "rationales" / "teacher_summary.json").read_text())
  assert summary["users_done"] == 40 - len(done) and summary["users_skipped"] == len(done)
  assert summary["requests"] == 40 - len(done)


def test_the_spending_cap_spans_both_kinds_and_stops_with_every_answer_kept(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  with FaultServer() as server:
    capped = run_stage(run, server.base_url, "--num_users=10", "--max_tokens=64",
                       "--max_total_tokens=4000", "--concurrency=2")
    first_requests = len(server.log)
  assert capped.returncode == 3, capped.stderr
  assert "stopped at --max_total_tokens=4000" in capped.stderr
  layout = RunLayout(str(run))
  files = [layout.rationale_file(prompts.source_name("teacher", k)) for k in prompts.KINDS]
  written = [rationales.read(f) if os.path.exists(f) else [] for f in files]
  done = sum(len(w) for w in written)
  assert 0 < done < 20 and first_requests == done
  summaries = [json.loads(p.read_text()) for p in (run / "rationales").glob("*_summary.json")]
  assert sum(s["prompt_tokens"] + s["completion_tokens"] for s in summaries) <= 4000
  with FaultServer() as server:
    rest = run_stage(run, server.base_url, "--num_users=10", "--max_tokens=64",
                     "--concurrency=2")
    assert rest.returncode == 0, rest.stderr
    assert len(server.log) == 20 - done  # no user asked twice


def test_key_never_appears_in_files_or_output(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  # A careless endpoint that echoes the Authorization header in its error bodies.
  plan = lambda key, attempt: "500" if attempt == 1 else "ok"
  with FaultServer(plan, secret_echo=True) as server:
    result = run_stage(run, server.base_url, "--kinds=eval", "--num_users=6", "--verbosity=1",
                       "--price=0.5,1.5", key=SECRET)
    assert result.returncode == 0, result.stderr
    assert {r.authorization for r in server.log} == {f"Bearer {SECRET}"}  # the key was used
  assert "retries: 6" in result.stdout.replace("(6 retries", "retries: 6")
  with FaultServer(lambda key, attempt: "401") as server:
    refused = run_stage(run, server.base_url, "--kinds=eval", "--num_users=12", "--verbosity=1",
                        key=SECRET)
  assert refused.returncode == 2 and "HTTP 401" in refused.stderr
  outputs = result.stdout + result.stderr + refused.stdout + refused.stderr
  assert SECRET not in outputs and SECRET[8:30] not in outputs
  written = [p for p in run.rglob("*") if p.is_file() and "data" not in p.relative_to(run).parts
             and "raw" not in p.relative_to(run).parts]
  assert {p.name for p in written} == {"teacher.jsonl", "teacher_manifest.json",
                                      "teacher_summary.json", "teacher.lock"}
  for path in written:
    assert SECRET.encode() not in path.read_bytes(), path


def test_a_second_run_on_the_same_workdir_is_refused(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  with FaultServer(lambda key, attempt: "slow", slow_seconds=0.2) as server:
    first = run_stage(run, server.base_url, "--num_users=20", "--concurrency=1", wait=False)
    out = run / "rationales" / "teacher.jsonl"
    while not (out.exists() and lines(run)):
      assert first.poll() is None, first.communicate()
      time.sleep(0.02)
    second = run_stage(run, server.base_url, "--num_users=20")
    first.kill()
    first.communicate()
  assert second.returncode == 1 and "another teacher run holds" in second.stderr


def test_duplicate_lines_are_dropped_before_resuming(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  with FaultServer() as server:
    assert run_stage(run, server.base_url, "--num_users=4", "--kinds=eval").returncode == 0
    out = run / "rationales" / "teacher.jsonl"
    first_line = out.read_text().splitlines()[0]
    with open(out, "a", encoding="utf-8") as f:
      f.write(first_line + "\n")  # as a crashed copy/merge might leave it
    result = run_stage(run, server.base_url, "--num_users=4", "--kinds=eval")
    assert result.returncode == 0 and len(server.log) == 4
  assert "dropped 1 duplicate" in result.stderr
  assert sorted(r["user_id"] for r in lines(run)) == sorted({r["user_id"] for r in lines(run)})
  assert len(lines(run)) == 4


def test_dry_run_calls_nothing(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  with FaultServer() as server:
    result = run_stage(run, server.base_url, "--num_users=5", "--dry_run", "--price=1,2",
                       key=SECRET)
    assert server.log == []
  assert result.returncode == 0, result.stderr
  assert "Sample prompt (user" in result.stdout and "Step 1:" in result.stdout
  assert "prompt tokens        mean" in result.stdout and SECRET not in result.stdout
  assert not (run / "rationales").exists()


def test_changed_settings_are_refused_on_resume(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  with FaultServer() as server:
    assert run_stage(run, server.base_url, "--num_users=3").returncode == 0
    result = run_stage(run, server.base_url, "--num_users=3", "--temperature=0.7")
    assert result.returncode != 0 and "temperature" in result.stderr
    result = run_stage(run, server.base_url, "--num_users=3", "--max_history=2")
    assert result.returncode != 0 and "max_history" in result.stderr
    assert len(server.log) == 6  # 3 users, an evaluation and a training rationale each


def test_every_line_records_its_fingerprint_and_foreign_lines_are_refused(workdir, tmp_path):
  run = fresh_workdir(workdir, tmp_path)
  with FaultServer() as server:
    assert run_stage(run, server.base_url, "--num_users=3").returncode == 0
    for source in ("teacher", "teacher_train"):
      prints = {r.get("fingerprint") for r in rationales.read(
          str(run / "rationales" / f"{source}.jsonl"))}
      assert len(prints) == 1 and None not in prints
    out = run / "rationales" / "teacher.jsonl"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    records[1]["fingerprint"] = "0" * 64  # a line another run wrote
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = out.read_bytes()
    result = run_stage(run, server.base_url, "--num_users=3")
    assert result.returncode != 0 and "another fingerprint" in result.stderr
    assert "teacher.jsonl" in result.stderr and out.read_bytes() == before
    assert len(server.log) == 6


def test_written_rationales_never_saw_what_they_are_read_for(workdir, tmp_path):
  """teacher_train.jsonl: no prompt holds an item at or after its cutoff; teacher.jsonl:
  no prompt holds a validation or test target (what the written files say, not the code)."""
  run = fresh_workdir(workdir, tmp_path)
  dataset = prepare.prepare_or_load("synthetic", None, str(workdir))
  with FaultServer() as server:
    result = run_stage(run, server.base_url, "--num_users=30", "--max_history=1000",
                       "--holdout=4")
    assert result.returncode == 0, result.stderr
  described = lambda i: prompts.describe_item(dataset.item(int(i)))  # noqa: E731
  for source, kind in (("teacher_train", "train"), ("teacher", "eval")):
    records = rationales.read(str(run / "rationales" / f"{source}.jsonl"))
    assert len(records) == 30
    for r in records:
      u, prompt = r["user_id"], r["messages"][-1]["content"]
      prefix = dataset.train_prefix(u)
      assert r["cutoff"] == prompts.cutoff(dataset, u, kind, holdout=4)
      shown = {line.split(". ", 1)[1] for line in prompt.splitlines() if line[:1].isdigit()}
      assert shown == {described(i) for i in prefix[:r["cutoff"]]}
      later = set(prefix[r["cutoff"]:].tolist()) | {dataset.valid_target(u),
                                                    dataset.test_target(u)}
      for i in later - set(prefix[:r["cutoff"]].tolist()):  # a repeat may be in both
        assert described(i) not in shown
      if kind == "train":
        assert r["cutoff"] < len(prefix)


def test_no_prompt_of_the_prepared_dataset_holds_a_valid_or_test_item(workdir):
  dataset = prepare.prepare_or_load("synthetic", None, str(workdir))
  for user in range(dataset.num_users):
    shown = prompts.history_items(dataset, user, max_history=10_000)
    assert shown == [int(i) for i in dataset.sequences[user][:-2]]
    text = prompts.build_messages(dataset, user, max_history=10_000)[-1]["content"]
    lines_shown = [line for line in text.splitlines() if line[:1].isdigit()]
    assert len(lines_shown) == len(shown)
    for target in (dataset.valid_target(user), dataset.test_target(user)):
      if target not in shown:  # a repeated item may legitimately be in the prefix too
        assert prompts.describe_item(dataset.item(target)) not in lines_shown
