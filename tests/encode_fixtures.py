"""Shared by the encoding tests: a tiny random BERT folder with a real tokenizer, and a small
workdir (prepared data + rationale files) for the encoding stage."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from slim_jax import assets
from slim_jax.data import dataset as dataset_lib
from slim_jax.convert import pretrained
from slim_jax.models import bert

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "rationales_fixture.jsonl")


def minilm_path() -> str:
  return assets.minilm_folder()


def tiny_encoder_folder(path: str, max_seq_length: int = 24, normalize: bool = True) -> str:
  """A random 2-layer BERT (MiniLM's tokenizer) laid out as a sentence-transformers folder."""
  import transformers
  cfg = bert.BertConfig.tiny(vocab_size=30522, hidden_size=32, intermediate_size=64,
                             max_position_embeddings=64)
  pretrained.save_bert(cfg, bert.init_params(cfg, jax.random.key(0)), path,
                       tokenizer=transformers.AutoTokenizer.from_pretrained(minilm_path()))
  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models."
              "Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers."
              "models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump(modules, f)
  os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True}, f)
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": max_seq_length, "do_lower_case": False}, f)
  return path


def fixture_records(n: int) -> list[dict]:
  with open(FIXTURE, encoding="utf-8") as f:
    return [json.loads(line) for _, line in zip(range(n), f)]


def make_workdir(workdir: str, num_items: int = 12, num_users: int = 6,
                 rationale_users=(0, 2, 3, 5)) -> dataset_lib.SequenceDataset:
  """Prepared data in <workdir>/data and rationales/teacher.jsonl for `rationale_users`
  (fixture rationales; user 3's response does not parse into steps)."""
  items = [dataset_lib.Item(item_id=i, raw_id=f"A{i}", title=f"Game {i}", brand="Sega",
                            categories=("Video Games",),
                            text=f"Title: Game {i}; Brand: Sega; Categories: Video Games")
           for i in range(1, num_items + 1)]
  rng = np.random.default_rng(0)
  sequences = [rng.integers(1, num_items + 1, 5).astype(np.int32) for _ in range(num_users)]
  data = dataset_lib.SequenceDataset(
      items=items, user_raw_ids=[f"U{u}" for u in range(num_users)], sequences=sequences,
      timestamps=[np.arange(5, dtype=np.int64) for _ in range(num_users)], name="tiny")
  dataset_lib.save(data, os.path.join(workdir, "data"))
  records = fixture_records(len(rationale_users))
  for user, record in zip(rationale_users, records):
    record["user_id"] = user
    if user == 3:
      record["steps"] = None
  write_rationales(workdir, "teacher", records)
  return data


def write_rationales(workdir: str, source: str, records, extra_lines=()) -> str:
  path = os.path.join(workdir, "rationales", f"{source}.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return path
