"""benchmarks/recommenders.py plumbing: the worker protocol and the ml-100k subset."""

import os
import sys
import textwrap

import pytest

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(_BENCH))

import importlib.util  # noqa: E402

import _worker  # noqa: E402

# Loaded under its own name: tests/recommenders/ would shadow a bare `import recommenders`.
_spec = importlib.util.spec_from_file_location("bench_recommenders",
                                               os.path.join(_BENCH, "recommenders.py"))
recommenders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recommenders)


def test_worker_round_trip_and_errors(tmp_path):
  script = tmp_path / "echo_worker.py"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {os.path.abspath(_BENCH)!r})
      import _worker
      def add(a, b):
        print("noise on stdout must not break the protocol")
        return {{"sum": a + b}}
      def boom():
        raise ValueError("bad")
      def env(name):
        return {{"value": os.environ.get(name)}}
      _worker.serve({{"add": add, "boom": boom, "env": env}})
  """))
  w = _worker.Worker([sys.executable, str(script)], log_path=str(tmp_path / "log"),
                     env=recommenders.MALLOC_ENV)
  try:
    assert w.call("add", a=2, b=3) == {"sum": 5}
    assert w.call("env", name="MALLOC_MMAP_THRESHOLD_") == {"value": str(2**30)}
    assert w.call("env", name="PATH")["value"] == os.environ["PATH"]  # added, not replaced
    with pytest.raises(_worker.WorkerError, match="ValueError: bad"):
      w.call("boom")
    assert w.call("peak_rss")["bytes"] > 0
    assert w.call("add", a=1, b=1) == {"sum": 2}  # still serving after an error
  finally:
    w.close()


def test_subset_keeps_first_users(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "ml-100k.inter").write_text(
      "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
      "10\t1\t5\t3\n2\t1\t4\t1\n3\t2\t4\t2\n2\t3\t1\t5\n")
  (src / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\n1\ta\n")
  folder, name = recommenders.subset_ml100k(str(src), str(tmp_path / "out"), 2)
  assert name == recommenders.SUBSET_NAME and os.path.basename(folder) == name
  lines = open(os.path.join(folder, f"{name}.inter")).read().splitlines()
  assert [x.split("\t")[0] for x in lines[1:]] == ["2", "3", "2"]  # users 2 and 3, not 10
  # Our loader's names point at the same files.
  assert open(os.path.join(folder, "ml-100k.inter")).read() == "\n".join(lines) + "\n"
  assert os.path.exists(os.path.join(folder, "ml-100k.item"))
