"""The encoding stage (slim_jax.encode.run_stage, experiments/encode.py) on a small workdir
with a tiny random BERT: the file contract, reruns that encode nothing, one changed item
re-encoded alone, and bad inputs (empty text, overlong text, malformed rationale lines)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from slim_jax import encode
from slim_jax.data import dataset as dataset_lib
from encode_fixtures import (fixture_records, make_workdir, tiny_encoder_folder,
                             write_rationales)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
  return encode.TextEncoder(tiny_encoder_folder(str(tmp_path_factory.mktemp("enc"))),
                            batch_size=4)


def emb(workdir, name):
  return np.load(os.path.join(workdir, "embeddings", f"{name}.npy"))


def stamps(workdir):
  d = os.path.join(workdir, "embeddings")
  return {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in os.listdir(d)
          if n.endswith(".npy")}


def test_contract_rerun_and_one_changed_item(encoder, tmp_path):
  workdir = str(tmp_path)
  data = make_workdir(workdir)
  summary = encode.run_stage(workdir, encoder, progress=False)
  items = emb(workdir, "items")
  assert items.shape == (13, 32) and items.dtype == np.float32
  assert not items[0].any()
  direct, _ = encoder.encode([it.text for it in data.items])
  np.testing.assert_allclose(items[1:], direct, atol=1e-6)
  teacher, present = emb(workdir, "teacher"), emb(workdir, "teacher.present")
  assert teacher.shape == (6, 32) and present.tolist() == [1, 0, 1, 1, 0, 1]
  assert not teacher[[1, 4]].any()
  records = fixture_records(4)
  np.testing.assert_allclose(teacher[[0, 2, 3, 5]],
                             encoder.encode([r["response"] for r in records])[0], atol=1e-6)
  step2 = emb(workdir, "teacher_step2")
  assert emb(workdir, "teacher_step2.present").tolist() == [1, 0, 1, 0, 0, 1]  # 3: no steps
  np.testing.assert_allclose(step2[0], encoder.encode([records[0]["steps"]["step2"]])[0][0],
                             atol=1e-6)
  assert not os.path.exists(os.path.join(workdir, "embeddings", "student.npy"))
  with open(os.path.join(workdir, "embeddings", "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["encoder"]["pooling"] == "mean" and manifest["encoder"]["normalize"]
  assert manifest["encoder"]["dim"] == 32 and manifest["encoder"]["max_length"] == 24
  assert set(manifest["outputs"]) == {"items", "teacher", "teacher_step1", "teacher_step2",
                                      "teacher_step3"}
  hashes = manifest["outputs"]["items"]["text_sha256"]
  assert hashes[0] is None and hashes[1] == encode.text_sha256(data.items[0].text)
  assert manifest["outputs"]["teacher"]["text_sha256"][1] is None
  assert manifest["outputs"]["teacher"]["truncated"] == 4  # fixture rationales > 24 tokens
  assert summary["encoded"] == 12 + 4 + 3 * 3  # each item text is distinct

  before = stamps(workdir)
  again = encode.run_stage(workdir, encoder, progress=False)
  assert again["encoded"] == 0 and stamps(workdir) == before

  # One item's description changes: that text alone is encoded, only items.npy rewritten.
  data.items[4] = dataset_lib.Item(5, "A5", "New", "Sony", ("Games",), "A brand new text")
  dataset_lib.save(data, os.path.join(workdir, "data"))
  changed = encode.run_stage(workdir, encoder, progress=False)
  assert changed["encoded"] == 1 and changed["outputs"]["items"]["encoded"] == 1
  after = stamps(workdir)
  assert [n for n in after if after[n] != before[n]] == ["items.npy"]
  new_items = emb(workdir, "items")
  np.testing.assert_array_equal(np.delete(new_items, 5, 0), np.delete(items, 5, 0))
  np.testing.assert_allclose(new_items[5], encoder.encode(["A brand new text"])[0][0],
                             atol=1e-6)

  # The student's rationales arrive later: only they are encoded.
  write_rationales(workdir, "student", [dict(r, user_id=u) for u, r in
                                        zip((1, 4), fixture_records(6)[4:])])
  student = encode.run_stage(workdir, encoder, progress=False)
  assert student["outputs"]["student"]["encoded"] == 2
  assert student["encoded"] == 2 + 3 * 2
  assert emb(workdir, "student.present").tolist() == [0, 1, 0, 0, 1, 0]


def test_empty_and_overlong_texts(encoder, tmp_path, caplog):
  workdir = str(tmp_path)
  data = make_workdir(workdir)
  data.items[2] = dataset_lib.Item(3, "A3", "", "", (), "")
  data.items[6] = dataset_lib.Item(7, "A7", "Long", "", (), "very long words " * 500)
  dataset_lib.save(data, os.path.join(workdir, "data"))
  with caplog.at_level(logging.WARNING):
    summary = encode.run_stage(workdir, encoder, progress=False)
  assert "items: 1 empty texts (ids [3])" in caplog.text
  assert "items: 1 of 12 texts are longer than 24 tokens and were truncated" in caplog.text
  assert summary["outputs"]["items"]["empty"] == 1
  assert summary["outputs"]["items"]["truncated"] == 1
  items = emb(workdir, "items")
  np.testing.assert_allclose(items[3], encoder.encode([""])[0][0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(items[1:], axis=-1), 1.0, atol=1e-5)


def test_malformed_rationale_line_keeps_outputs(encoder, tmp_path):
  workdir = str(tmp_path)
  make_workdir(workdir)
  encode.run_stage(workdir, encoder, progress=False)
  with open(os.path.join(workdir, "embeddings", "teacher.npy"), "rb") as f:
    old = f.read()
  good = fixture_records(3)
  path = write_rationales(workdir, "teacher", [dict(good[0], user_id=0)],
                          extra_lines=['{"user_id": 2, "response": ', json.dumps(
                              dict(good[1], user_id=99)), json.dumps(dict(good[2], user_id=5))])
  with pytest.raises(ValueError, match=f"{path}:2: malformed rationale line"):
    encode.run_stage(workdir, encoder, progress=False)
  with open(os.path.join(workdir, "embeddings", "teacher.npy"), "rb") as f:
    assert f.read() == old  # nothing written
  summary = encode.run_stage(workdir, encoder, skip_bad_lines=True, progress=False)
  skipped = summary["skipped_lines"]["teacher"]
  assert len(skipped) == 2 and f"{path}:3" in skipped[1] and "outside 0..5" in skipped[1]
  assert emb(workdir, "teacher.present").tolist() == [1, 0, 0, 0, 0, 1]


def test_requested_source_must_exist(encoder, tmp_path):
  workdir = str(tmp_path)
  make_workdir(workdir)
  with pytest.raises(FileNotFoundError, match="student.jsonl does not exist"):
    encode.run_stage(workdir, encoder, sources=["student"], progress=False)
  with pytest.raises(ValueError, match="unknown rationale source 'teachers'"):
    encode.run_stage(workdir, encoder, sources=["teachers"], progress=False)


def _run_script(*flags):
  env = {**os.environ, "PYTHONPATH": _REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, os.path.join(_REPO, "experiments", "encode.py"),
                         *flags], capture_output=True, text=True, env=env, cwd=_REPO,
                        timeout=600, check=False)


def test_script_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  make_workdir(workdir)
  folder = tiny_encoder_folder(str(tmp_path / "enc"))
  result = _run_script(f"--workdir={workdir}", f"--encoder={folder}", "--batch_size=8",
                       "--sources=teacher", "--pooling=cls", "--nonormalize",
                       "--max_length=16", "--noprogress")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "encoded 25 new texts" in result.stdout
  with open(os.path.join(workdir, "embeddings", "manifest.json")) as f:
    ident = json.load(f)["encoder"]
  assert (ident["pooling"], ident["normalize"], ident["max_length"]) == ("cls", False, 16)
  bad = _run_script(f"--workdir={tmp_path / 'nothing'}", f"--encoder={folder}")
  assert bad.returncode == 1 and "prepare_data.py" in bad.stderr
