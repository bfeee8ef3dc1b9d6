"""slim_jax/pipeline/runner.py: a change reruns exactly the stages downstream of it; stale or
partial work of another fingerprint is never reused; a locked workdir refuses a second run."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from slim_jax.pipeline import runner as pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Chain:
  """raw.txt -> a (upper-cases it) -> b (reverses a, resumable by parts) -> c (a's and b's
  lengths). Each stage records how often it ran and the fingerprints it saw."""

  def __init__(self, work):
    self.work = str(work)
    self.runs: list[str] = []
    self.raw = os.path.join(self.work, "raw.txt")
    with open(self.raw, "w") as f:
      f.write("hello")
    self.params = {"a": {"repeat": 1}, "b": {}, "c": {}}

  def path(self, name):
    return os.path.join(self.work, name)

  def _a(self, fingerprint):
    self.runs.append("a")
    with open(self.raw) as f:
      text = f.read().upper() * self.params["a"]["repeat"]
    pipeline.io.write_text(self.path("a.txt"), text)

  def _b(self, fingerprint):
    self.runs.append("b")
    parts = self.path("b_parts")
    os.makedirs(parts, exist_ok=True)
    with open(self.path("a.txt")) as f:
      text = f.read()
    for i, ch in enumerate(reversed(text)):  # one unit of work per character, resumable
      unit = os.path.join(parts, f"{i}.json")
      if not os.path.exists(unit):
        pipeline.io.write_json(unit, {"ch": ch, "fingerprint": fingerprint})
    units = [pipeline.io.read_json(os.path.join(parts, f"{i}.json")) for i in range(len(text))]
    assert all(u["fingerprint"] == fingerprint for u in units), "stale unit reused"
    pipeline.io.write_text(self.path("b.txt"), "".join(u["ch"] for u in units)
                           + self.params["b"].get("suffix", ""))

  def _c(self, fingerprint):
    self.runs.append("c")
    pipeline.io.write_text(self.path("c.txt"), str(len(open(self.path("b.txt")).read())))

  def stages(self):
    S = pipeline.Stage
    return [S("a", self._a, [self.raw], [self.path("a.txt")], self.params["a"]),
            S("b", self._b, [self.path("a.txt")], [self.path("b.txt")], self.params["b"],
              work=[self.path("b.txt"), self.path("b_parts")]),
            S("c", self._c, [self.path("b.txt")], [self.path("c.txt")], self.params["c"])]

  def run(self, force=()):
    self.runs = []
    record = pipeline.Pipeline(self.work, log=lambda _: None).run(self.stages(), force=force)
    return [r["status"] for r in record]


@pytest.fixture
def chain(tmp_path):
  c = Chain(tmp_path)
  assert c.run() == ["done"] * 3
  return c


def test_unchanged_rerun_skips_every_stage(chain):
  assert chain.run() == ["skipped"] * 3 and chain.runs == []


def test_changed_raw_file_reruns_everything_downstream(chain):
  with open(chain.raw, "w") as f:
    f.write("world!")
  assert chain.run() == ["done"] * 3
  assert open(chain.path("b.txt")).read() == "!DLROW"


def test_changed_param_reruns_its_stage_and_downstream_only(chain):
  chain.params["b"]["suffix"] = "!"
  assert chain.run() == ["skipped", "done", "done"]
  assert open(chain.path("c.txt")).read() == "6"


def test_a_stage_whose_output_is_unchanged_stops_the_cascade(chain):
  chain.params["b"]["note"] = "same output"
  assert chain.run() == ["skipped", "done", "skipped"]


def test_force_recomputes_a_stage_from_scratch_and_everything_downstream(chain):
  stale = os.path.join(chain.path("b_parts"), "0.json")
  pipeline.io.write_json(stale, {"ch": "X", "fingerprint": "made by hand"})
  assert chain.run(force=["b"]) == ["skipped", "done", "done"]
  assert open(chain.path("b.txt")).read() == "OLLEH"
  with pytest.raises(ValueError, match="unknown stage"):
    chain.run(force=["z"])


def test_corrupted_manifest_reruns_its_stage(chain):
  with open(os.path.join(chain.work, "pipeline", "b.json"), "w") as f:
    f.write('{"fingerprint": ')
  assert chain.run() == ["skipped", "done", "skipped"]


def test_partial_work_of_another_fingerprint_is_deleted_not_resumed(chain):
  # A run with another flag is killed inside b (its marker and half its units stay) ...
  chain.params["a"]["repeat"] = 2
  chain.runs = []
  stages = chain.stages()
  runner = pipeline.Pipeline(chain.work, log=lambda _: None)
  runner.run(stages[:1])
  runner._prepare_work(stages[1], runner.wanted(stages[1])["fingerprint"], forced=False)
  pipeline.io.write_json(os.path.join(chain.path("b_parts"), "0.json"),
                         {"ch": "?", "fingerprint": "of the killed run"})
  # ... then the flag is reverted: a reruns, b must not trust the killed run's units.
  chain.params["a"]["repeat"] = 1
  assert chain.run() == ["done", "done", "skipped"]  # c's input is as it was: skipped
  assert open(chain.path("b.txt")).read() == "OLLEH"


def test_resume_within_a_stage_keeps_units_of_the_same_fingerprint(chain):
  stages = chain.stages()
  runner = pipeline.Pipeline(chain.work, log=lambda _: None)
  fingerprint = runner.wanted(stages[1])["fingerprint"]
  os.remove(os.path.join(chain.work, "pipeline", "b.json"))  # as if killed before the end
  pipeline.io.write_json(os.path.join(chain.work, "pipeline", "b.started.json"),
                         {"fingerprint": fingerprint})
  kept = os.path.join(chain.path("b_parts"), "1.json")
  mtime = os.stat(kept).st_mtime_ns
  assert chain.run() == ["skipped", "done", "skipped"]
  assert os.stat(kept).st_mtime_ns == mtime  # resumed, not recomputed


KILLED_STAGE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[2])
    from slim_jax import io
    from slim_jax.pipeline import runner as pipeline
    work = sys.argv[1]
    def slow(fingerprint):
      with io.atomic_open(os.path.join(work, "out.bin"), "wb") as f:
        f.write(b"half")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
    pipeline.Pipeline(work, log=print).run(
        [pipeline.Stage("slow", slow, [], [os.path.join(work, "out.bin")], {"v": 1})])
""")


def test_a_stage_killed_mid_write_leaves_nothing_a_rerun_trusts(tmp_path):
  work = str(tmp_path)
  proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, work, ROOT],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "writing"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(work, "out.bin"))  # only a temporary file
  assert not os.path.exists(os.path.join(work, "pipeline", "slow.json"))
  stage = pipeline.Stage("slow", lambda fp: pipeline.io.write_bytes(
      os.path.join(work, "out.bin"), b"whole"), [], [os.path.join(work, "out.bin")], {"v": 1})
  record = pipeline.Pipeline(work, log=lambda _: None).run([stage])
  assert record[0]["status"] == "done"
  assert open(os.path.join(work, "out.bin"), "rb").read() == b"whole"


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from slim_jax.pipeline import runner as pipeline
    with pipeline.workdir_lock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(60)
""")


def test_a_second_run_on_a_locked_workdir_fails_naming_the_holder(tmp_path):
  proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), ROOT],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(pipeline.WorkdirLocked, match=f"pid {proc.pid}"):
      with pipeline.workdir_lock(str(tmp_path)):
        pass
  finally:
    proc.kill()
    proc.wait()
  with pipeline.workdir_lock(str(tmp_path)):  # released when its holder died
    pass


def test_downstream_follows_paths_not_list_order(tmp_path):
  S = pipeline.Stage
  stages = [S("x", None, [], [str(tmp_path / "x")]), S("y", None, [], [str(tmp_path / "y")]),
            S("z", None, [str(tmp_path / "x" / "file")], [str(tmp_path / "z")])]
  assert pipeline.downstream(stages, ["x"]) == {"x", "z"}
  assert json.dumps(sorted(pipeline.downstream(stages, ["y"]))) == '["y"]'
