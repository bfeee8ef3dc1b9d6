"""experiments/distill.py killed by SIGKILL mid-run and started again ends like an unbroken run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "rationales_fixture.jsonl")
NUM_STEPS = 10


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
  """A random 2-layer LLaMA in a Hugging Face folder, with the SmolLM2 tokenizer."""
  import torch
  import transformers
  sys.path.insert(0, os.path.join(REPO, "tests", "train"))
  import distill_fixtures  # pylint: disable=import-outside-toplevel
  tok = distill_fixtures.smollm2_tokenizer()
  folder = str(tmp_path_factory.mktemp("tiny_student"))
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
      max_position_embeddings=512, rope_theta=10000.0)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  tok.save_pretrained(folder)
  rationales = os.path.join(folder, "teacher.jsonl")
  with open(FIXTURE, encoding="utf-8") as f, open(rationales, "w", encoding="utf-8") as out:
    out.writelines(f.readlines()[:20])
  return folder, rationales


def _command(workdir, student):
  folder, rationales = student
  return [sys.executable, os.path.join(REPO, "experiments", "distill.py"),
          f"--workdir={workdir}", f"--init_from={folder}", f"--rationales={rationales}",
          f"--num_steps={NUM_STEPS}", "--batch_size=4", "--max_length=384",
          "--checkpoint_every=2", "--log_every=1", "--eval_every=5", "--warmup_steps=2",
          "--learning_rate=5e-3", "--lora_dropout=0.1", "--heldout_fraction=0.2",
          "--noprogress"]


def _env():
  env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device in the child processes
  return env


def _steps_saved(workdir):
  folder = os.path.join(workdir, "distill", "checkpoints")
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _summary(workdir):
  with open(os.path.join(workdir, "distill", "summary.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow  # three processes of a 49k-vocabulary model: 3-5 minutes on 2 cores
def test_sigkill_and_resume_ends_like_uninterrupted_run(tmp_path, tiny_student):
  from safetensors.numpy import load_file

  straight = str(tmp_path / "straight")
  result = subprocess.run(_command(straight, tiny_student), env=_env(), timeout=900,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]

  broken = str(tmp_path / "broken")
  log = open(tmp_path / "broken.log", "w")
  proc = subprocess.Popen(_command(broken, tiny_student), env=_env(), stdout=log, stderr=log)
  deadline = time.time() + 900
  while time.time() < deadline and proc.poll() is None and max(_steps_saved(broken) or [0]) < 4:
    time.sleep(0.2)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  saved = _steps_saved(broken)
  assert saved and max(saved) < NUM_STEPS
  assert not os.path.exists(os.path.join(broken, "distill", "summary.json"))

  result = subprocess.run(_command(broken, tiny_student), env=_env(), timeout=900,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  resumed, reference = _summary(broken), _summary(straight)
  print("killed after checkpoint", max(saved), "resumed:", resumed, "straight:", reference)
  assert resumed["resumed_from"] is not None and 4 <= resumed["resumed_from"] < NUM_STEPS
  assert resumed["steps"] == reference["steps"] == NUM_STEPS
  assert resumed["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-6)
  assert resumed["final_heldout_nll"] == pytest.approx(reference["final_heldout_nll"], abs=1e-6)
  assert resumed["initial_heldout_nll"] == pytest.approx(reference["initial_heldout_nll"])
  a = load_file(os.path.join(broken, "distill", "peft_adapter", "adapter_model.safetensors"))
  b = load_file(os.path.join(straight, "distill", "peft_adapter", "adapter_model.safetensors"))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-6)
  # The metrics file reads like one run: each training step logged exactly once.
  with open(os.path.join(broken, "distill", "logs", "metrics.jsonl"), encoding="utf-8") as f:
    steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
  assert steps == list(range(1, NUM_STEPS + 1))


def test_smoke_run_writes_adapter_reports_and_logs(tmp_path, tiny_student):
  from slim_jax.models import lora
  workdir = str(tmp_path / "run")
  command = [c for c in _command(workdir, tiny_student) if not c.startswith("--num_steps")]
  result = subprocess.run(command + ["--num_steps=2", "--checkpoint_every=1"], env=_env(),
                          timeout=900, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(workdir, "distill")
  summary = _summary(workdir)
  assert summary["steps"] == 2 and summary["train_examples"] + summary["heldout_examples"] == 20
  with open(os.path.join(out, "truncation_report.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["examples_read"] == 20 and report["max_length"] == 384
  adapter, spec = lora.load_peft(os.path.join(out, "peft_adapter"))
  assert spec.rank == 8 and set(adapter["layers_1"]["self_attn"]) == {
      "q_proj", "k_proj", "v_proj", "o_proj"}
  assert _steps_saved(workdir) == [1, 2]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "logs")))


@pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
def test_the_base_loads_and_trains_in_float32_and_bfloat16(tmp_path, tiny_student, param_dtype):
  import jax
  from slim_jax.convert import pretrained
  from slim_jax.models import lora
  from slim_jax.pipeline import stages
  from slim_jax.pipeline.layout import RunLayout
  from slim_jax.train import distill as distill_lib
  folder, rationales = tiny_student
  _, params, _ = pretrained.load_llama(folder, param_dtype=param_dtype)
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {param_dtype or "float32"}
  train = distill_lib.DistillConfig(batch_size=8, max_length=384, eval_every=1000,
                                    checkpoint_every=1000)
  summary = stages.distill(RunLayout(str(tmp_path)), stages.DistillStageConfig(
      init_from=folder, train=train, rationales=rationales, num_steps=2,
      param_dtype=param_dtype, progress=False))
  assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
  assert summary["final_heldout_nll"] < summary["initial_heldout_nll"] + 1.0
  adapter, _ = lora.load_peft(summary["adapter"])
  assert {str(x.dtype) for x in jax.tree.leaves(adapter)} == {"float32"}
