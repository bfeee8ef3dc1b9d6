"""Atomic writes: the target is the old file or the new one, never half of one."""

import json
import os

import pytest

from slim_jax import io


def test_write_json_replaces_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "a.json"
  io.write_json(str(path), {"x": 1})
  io.write_json(str(path), {"x": "é"})
  assert json.loads(path.read_text(encoding="utf-8")) == {"x": "é"}
  assert os.listdir(path.parent) == ["a.json"]


def test_an_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = tmp_path / "a.txt"
  io.write_text(str(path), "old")
  with pytest.raises(RuntimeError):
    with io.atomic_open(str(path)) as f:
      f.write("half of the new")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["a.txt"]


def test_temporary_names_are_unique_and_recognisable(tmp_path):
  a, b = io.temporary_name(str(tmp_path / "x")), io.temporary_name(str(tmp_path / "x"))
  assert a != b and io.is_temporary(a) and not io.is_temporary(str(tmp_path / "x.json"))


def test_read_json_names_the_file(tmp_path):
  path = tmp_path / "m.json"
  path.write_text("{not json")
  with pytest.raises(ValueError, match="m.json: this manifest is not valid JSON"):
    io.read_json(str(path), "manifest")


def test_jsonl_appender_cuts_a_torn_tail_and_reader_names_file_and_line(tmp_path):
  path = str(tmp_path / "rows.jsonl")
  with open(path, "w") as f:
    f.write('{"a": 1}\n{"a": 2')  # killed mid-append
  assert io.read_jsonl(path) == [{"a": 1}]  # the torn line is skipped
  with io.JsonlAppender(path) as out:
    out.append({"a": 3})
  assert io.read_jsonl(path) == [{"a": 1}, {"a": 3}]
  with open(path, "a") as f:
    f.write("not json\n{\"a\": 4}\n")
  with pytest.raises(ValueError, match=r"rows.jsonl:3: malformed row"):
    io.read_jsonl(path, what="row")


def test_jsonl_validate_rejects_with_the_location(tmp_path):
  path = str(tmp_path / "rows.jsonl")
  io.write_jsonl(path, [{"id": 1}, {"no_id": 2}])

  def need_id(row, where):
    if "id" not in row:
      raise ValueError(f"{where}: no id")
  with pytest.raises(ValueError, match=r"rows.jsonl:2: no id"):
    io.read_jsonl(path, need_id)


def test_a_whole_last_line_without_newline_is_kept_and_appended_after(tmp_path):
  path = str(tmp_path / "rows.jsonl")
  with open(path, "w") as f:
    f.write('{"a": 1}\n{"a": 2}')  # written by hand, no final newline
  assert io.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  with io.JsonlAppender(path) as out:
    out.append({"a": 3})
  assert io.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
