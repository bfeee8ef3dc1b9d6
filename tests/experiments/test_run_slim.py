"""experiments/run_slim.py: bad flags stop before any work; the smoke preset end to end (with
a tiny random student in the default suite; with SmolLM2, killed mid-stage, when slow)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from llama_fixtures import write_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "experiments", "run_slim.py")


def _run(*args, timeout=1500):
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="")
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("flag,message", [
    ("--backbones=bert4rec", "unknown backbone"),
    ("--data_dir=/nonexistent/folder", "is not a folder"),
    ("--teacher_base_url=http://127.0.0.1:9/v1", "does not answer"),
    ("--variants=slim++", "unknown variant"),
])
def test_bad_flags_stop_before_any_work(tmp_path, flag, message):
  work = tmp_path / "w"
  proc = _run(f"--workdir={work}", "--preset=smoke", flag, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr + proc.stdout
  assert not work.exists()  # nothing was written


def test_stop_after_runs_the_stages_up_to_it_only(tmp_path):
  work = tmp_path / "w"
  # A forced stage after the last one run is not an error: it is not run either.
  proc = _run(f"--workdir={work}", "--preset=smoke", "--stop_after=prepare", "--force=report",
              timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "stopped after the prepare stage" in proc.stdout
  assert _statuses(work) == {"prepare": "done"}
  assert not (work / "rationales").exists()


def test_start_at_neither_runs_nor_checks_the_stages_before_it(tmp_path):
  work = tmp_path / "w"
  proc = _run(f"--workdir={work}", "--preset=smoke", "--start_at=report",
              "--stop_after=prepare", timeout=300)
  assert proc.returncode != 0 and "no stage would run" in proc.stderr + proc.stdout
  assert not work.exists()
  assert _run(f"--workdir={work}", "--preset=smoke", "--stop_after=prepare",
              timeout=300).returncode == 0
  # The encode stage reads rationales that only the teacher and generate stages write:
  # starting there names what is missing, and nothing before it ran.
  proc = _run(f"--workdir={work}", "--preset=smoke", "--start_at=encode", timeout=300)
  assert proc.returncode != 0
  assert "--start_at=encode" in proc.stderr and "teacher.jsonl" in proc.stderr
  assert _statuses(work) == {"prepare": "done"}
  assert not (work / "rationales").exists()


def _users(path) -> list[int]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["user_id"] for line in f if line.endswith("\n")]


def _kill_during_teacher_stage(work, min_users: int = 3, timeout: float = 900) -> list[int]:
  """Starts the smoke preset, SIGKILLs its whole process tree once the teacher stage has
  written `min_users` rationales; returns the users written before the kill."""
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, SCRIPT, f"--workdir={work}", "--preset=smoke"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                          cwd=ROOT, start_new_session=True)
  teacher = work / "rationales" / "teacher.jsonl"
  deadline = time.monotonic() + timeout
  try:
    while not (teacher.exists() and len(_users(teacher)) >= min_users):
      assert proc.poll() is None, "the pipeline ended before it could be killed"
      assert time.monotonic() < deadline, "the teacher stage wrote nothing in time"
      time.sleep(0.5)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, the teacher client and the server
    proc.wait()
  return _users(teacher)


def _check_outputs(work, variants) -> None:
  """Every artifact exists, the student wrote each user once, every metric is in [0, 1]."""
  for rel in ("data/items.jsonl", "rationales/teacher.jsonl", "rationales/student.jsonl",
              "rationales/teacher_train.jsonl", "rationales/student_train.jsonl",
              "distill/peft_adapter", "embeddings/items.npy", "embeddings/student.npy",
              "embeddings/student_train.cutoff.npy", "embeddings/teacher.npy",
              "recommend/results.json", "report/results.md", "report/results.csv",
              "report/claims.csv", "report/curves.png", "report/results.png",
              "report/interpretability.md"):
    assert (work / rel).exists(), rel
  for writer in ("teacher", "student"):  # training rationales end before the prefix does
    train = {r["user_id"]: r["cutoff"] for r in map(json.loads, (
        work / "rationales" / f"{writer}_train.jsonl").open())}
    final = {r["user_id"]: r["cutoff"] for r in map(json.loads, (
        work / "rationales" / f"{writer}.jsonl").open())}
    assert train.keys() == final.keys() and all(train[u] < final[u] for u in train)
  teacher_users = _users(work / "rationales" / "teacher.jsonl")
  student_users = _users(work / "rationales" / "student.jsonl")
  assert len(set(student_users)) == len(student_users)
  assert set(teacher_users) <= set(student_users)  # the student writes for every user
  with open(work / "report" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert set(variants) <= {r["variant"] for r in rows}
  for row in rows:
    for key, value in row.items():
      if key.endswith("_mean") or key.endswith("_std"):
        assert 0.0 <= float(value) <= 1.0, (row, key)


def _assert_rerun_skips_everything(work, *args) -> None:
  second = _run(f"--workdir={work}", "--preset=smoke", *args, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  record = json.loads((work / "pipeline" / "last_run.json").read_text())
  assert [r["status"] for r in record] == ["skipped"] * 7, record


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
  return write_tiny_llama(tmp_path_factory.mktemp("tiny_student"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_student):
  """One smoke pipeline run with a tiny student: (workdir, the flags it ran with)."""
  # A random 2-layer student keeps the LLM stages to seconds; its text has no step
  # structure, so the Step ablations (which need parsed steps) are left out here.
  work = tmp_path_factory.mktemp("smoke") / "w"
  args = (f"--student={tiny_student}", f"--variants={','.join(SMOKE_VARIANTS)}")
  first = _run(f"--workdir={work}", "--preset=smoke", *args, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  assert first.stdout.count("done in") == 7, first.stdout
  return work, args


SMOKE_VARIANTS = ("backbone", "backbone+", "slim-", "slim", "slim-shuffled", "agnostic",
                  "agnostic-history")


@pytest.mark.slow  # 4-5 minutes; CI's fresh-machine check (.ci/fresh_machine.sh) runs the
# smoke preset end to end with the real SmolLM2, checks its outputs and that a rerun skips
def test_smoke_pipeline_end_to_end_with_a_tiny_student_then_rerun_skips(smoke_run):
  work, args = smoke_run
  _check_outputs(work, SMOKE_VARIANTS)
  _assert_rerun_skips_everything(work, *args)


@pytest.mark.slow  # two more pipeline runs (about 3 minutes); the fast test above keeps the
# end-to-end run and the skip of an unchanged rerun
def test_changed_epochs_and_adapter_rerun_only_their_stages(smoke_run):
  work, args = smoke_run
  _another_epochs_retrains_and_reports_the_new_results(work, *args)
  _a_changed_adapter_rewrites_every_student_rationale(work, *args)


def _statuses(work) -> dict:
  record = json.loads((work / "pipeline" / "last_run.json").read_text())
  return {r["stage"]: r["status"] for r in record}


def _another_epochs_retrains_and_reports_the_new_results(work, *args) -> None:
  results = sorted((work / "recommend").glob("*/*/seed_*/result.json"))
  before = {json.loads(r.read_text())["fingerprint"] for r in results}
  rerun = _run(f"--workdir={work}", "--preset=smoke", "--epochs=1", *args, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert [k for k, v in _statuses(work).items() if v == "done"] == ["recommend", "report"]
  after = {json.loads(r.read_text())["fingerprint"] for r in results}
  assert len(before) == 1 and len(after) == 1 and before != after  # every seed trained again
  assert all(json.loads(r.read_text())["epochs_run"] <= 1 for r in results)
  by_cell = {(r.parts[-4], r.parts[-3]): json.loads(r.read_text())["test"] for r in results}
  with open(work / "report" / "results.csv") as f:
    for row in csv.DictReader(f):
      if row["variant"] == "most-popular":  # not trained: no seed folder
        continue
      assert abs(float(row["ndcg@10_mean"]) - by_cell[(row["backbone"], row["variant"])][
          "ndcg@10"]) < 1e-6  # one seed: the report's mean is that seed's new result


def _a_changed_adapter_rewrites_every_student_rationale(work, *args) -> None:
  from safetensors.numpy import load_file, save_file
  weights = work / "distill" / "peft_adapter" / "adapter_model.safetensors"
  tensors = load_file(str(weights))
  save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, str(weights),
            metadata={"format": "pt"})
  rerun = _run(f"--workdir={work}", "--preset=smoke", "--epochs=1", *args, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  statuses = _statuses(work)
  assert statuses["distill"] == "skipped" and statuses["generate"] == "done", statuses
  fingerprint = json.loads((work / "pipeline" / "generate.json").read_text())["fingerprint"]
  for source in ("student", "student_train"):
    records = [json.loads(line) for line in (work / "rationales" / f"{source}.jsonl").open()]
    assert records and all(r["fingerprint"] == fingerprint for r in records)


def test_sigterm_stops_the_pipeline_and_its_teacher_server(tmp_path, tiny_student):
  import psutil
  work = tmp_path / "w"
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, SCRIPT, f"--workdir={work}", "--preset=smoke",
                           f"--student={tiny_student}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
  servers = []
  try:
    deadline = time.monotonic() + 300
    while not servers:
      assert proc.poll() is None and time.monotonic() < deadline, "no teacher server started"
      servers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "slim_jax.serve" in " ".join(p.cmdline())]
      time.sleep(0.2)
    # A second run on the same workdir is refused while this one holds it.
    second = _run(f"--workdir={work}", "--preset=smoke", timeout=120)
    assert second.returncode != 0 and f"pid {proc.pid}" in second.stderr
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    _, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, "the teacher server outlived the pipeline"
  finally:
    if proc.poll() is None:
      proc.kill()


@pytest.mark.slow
def test_smoke_killed_mid_stage_completes_on_rerun_and_then_skips(tmp_path):
  work = tmp_path / "w"
  before_kill = _kill_during_teacher_stage(work)
  assert not (work / "pipeline" / "teacher.json").exists()  # the stage did not finish

  first = _run(f"--workdir={work}", "--preset=smoke")
  assert first.returncode == 0, first.stderr[-3000:]
  _check_outputs(work, ("backbone", "backbone+", "slim-", "slim", "agnostic",
                        "agnostic-step1"))
  # Nothing lost or duplicated: the users written before the kill come first, once each.
  teacher_users = _users(work / "rationales" / "teacher.jsonl")
  assert teacher_users[:len(before_kill)] == before_kill
  assert len(set(teacher_users)) == len(teacher_users)
  _assert_rerun_skips_everything(work)
