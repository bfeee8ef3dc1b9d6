"""experiments/generate.py: JSONL in, JSONL out, resume after an interrupted run, bad lines."""

import json
import os
import subprocess
import sys

import pytest

from slim_jax import assets

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(REPO, "experiments", "generate.py")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """A random 2-layer LLaMA folder with SmolLM2's tokenizer and chat template."""
  import torch
  import transformers
  from slim_jax.convert import gguf_llama
  tok = gguf_llama.load_tokenizer(assets.smollm2_gguf())
  folder = str(tmp_path_factory.mktemp("tiny_model"))
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  tok.save_pretrained(folder)
  return folder


ROWS = [{"id": 1, "messages": [{"role": "user", "content": "Recommend a puzzle game."}]},
        {"id": "b", "prompt": "The best racing game is"},
        {"id": 3, "messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"}]},
        {"id": 4, "prompt": "Once upon a time"},
        {"id": 5, "messages": [{"role": "user", "content": "Name a console."}]}]


def run(model, prompts, output, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, SCRIPT, f"--model={model}", f"--prompts={prompts}",
                         f"--output={output}", "--max_new_tokens=12", "--max_seq_len=256",
                         "--noprogress", *extra], env=env, capture_output=True, text=True,
                        timeout=600, check=False)


def test_generates_every_row_and_resumes_with_the_same_text(tiny_model, tmp_path):
  prompts, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  result = run(tiny_model, prompts, output, "--batch_size=4")
  assert result.returncode == 0, result.stderr
  assert "tokens/s" in result.stdout
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert sorted(map(str, (r["id"] for r in records))) == ["1", "3", "4", "5", "b"]
  by_id = {str(r["id"]): r for r in records}
  for row in ROWS:
    record = by_id[str(row["id"])]
    assert record.get("messages") == row.get("messages")
    assert record.get("prompt") == row.get("prompt")
    assert record["finish_reason"] in ("stop", "length") and isinstance(record["response"], str)
    assert 0 < record["usage"]["completion_tokens"] <= 12
    assert record["usage"]["prompt_tokens"] > 3
  # Interrupted run: two whole lines and a partial one are left; the rest is regenerated,
  # in other batches, with the same greedy text.
  lines = output.read_text().splitlines(keepends=True)
  output.write_text("".join(lines[:2]) + lines[2][:10])
  again = run(tiny_model, prompts, output, "--batch_size=2")
  assert again.returncode == 0, again.stderr
  resumed = {str(json.loads(line)["id"]): json.loads(line)
             for line in output.read_text().splitlines()}
  assert len(output.read_text().splitlines()) == 5
  for key, record in by_id.items():
    assert resumed[key]["response"] == record["response"]
  done = run(tiny_model, prompts, output)
  assert done.returncode == 0 and "nothing to do" in done.stdout


def test_bad_lines_name_the_line(tiny_model, tmp_path):
  prompts, output = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
  prompts.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "no id"}) + "\n")
  result = run(tiny_model, prompts, output)
  assert result.returncode != 0
  assert "prompts.jsonl, line 2: each line must be a JSON object with an 'id'" in result.stderr
  prompts.write_text(json.dumps({"id": 1, "prompt": "x", "messages": []}) + "\n")
  assert "exactly one of 'messages'" in run(tiny_model, prompts, output).stderr
