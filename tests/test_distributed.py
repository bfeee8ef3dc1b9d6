"""Two real processes joined through jax.distributed equal one process with as many devices.

Each process of the two-process job has 2 CPU devices (XLA_FLAGS), talks to the other
through gloo CPU collectives, and feeds only its rows of each global batch
(slim_jax/distributed.py). The worker (tests/distributed_worker.py) runs 3 distillation
steps (tiny LLaMA, LoRA, dropout, 2 microbatches) and 3 SASRec steps on a data=2,fsdp=2
mesh, so parameters are sharded across the processes. The losses must equal a one-process
run on 4 devices to 1e-5, and the orbax checkpoint the two processes wrote together must
restore in one process to the adapter they trained.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from slim_jax import distributed

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
TIMEOUT = 900  # seconds per phase; the shared 2-core test machine can be very busy


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(procs):
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=TIMEOUT)
      outputs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]


def _load(path):
  with open(path) as f:
    return json.load(f)


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("dist")
  port = _free_port()
  pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  two = [subprocess.Popen([sys.executable, WORKER, str(tmp / f"two_{i}.json"),
                           str(tmp / "ckpt_two"), "train", f"127.0.0.1:{port}", "2", str(i)],
                          env=_env(2), **pipe) for i in range(2)]
  one = subprocess.Popen([sys.executable, WORKER, str(tmp / "one.json"), str(tmp / "ckpt_one"),
                          "train"], env=_env(4), **pipe)
  _run(two + [one])
  restore = subprocess.Popen([sys.executable, WORKER, str(tmp / "restored.json"),
                              str(tmp / "ckpt_two"), "restore"], env=_env(4), **pipe)
  _run([restore])
  return (_load(tmp / "two_0.json"), _load(tmp / "one.json"), _load(tmp / "restored.json"),
          tmp)


@pytest.mark.slow  # 3 JAX processes compiling at once: ~6 min on the busy 2-core machine
def test_two_processes_match_one_process(runs):
  two, one, _, tmp = runs
  assert (two["processes"], two["devices"], two["local_devices"]) == (2, 4, 2)
  assert (one["processes"], one["devices"]) == (1, 4)
  assert not os.path.exists(tmp / "two_1.json")  # only process 0 writes
  print("distill", two["distill_losses"], one["distill_losses"])
  print("recommender", two["recommender_losses"], one["recommender_losses"])
  np.testing.assert_allclose(two["distill_losses"], one["distill_losses"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(two["recommender_losses"], one["recommender_losses"],
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(_leaves(two["lora"]), _leaves(one["lora"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The steps really trained (losses moved) and the adapter is non-trivial.
  assert len(set(np.round(two["distill_losses"], 6))) == 3
  assert any(np.abs(x).max() > 0 for x in _leaves(two["lora"]))


@pytest.mark.slow
def test_fsdp_across_processes_distils_to_the_end_and_exports_the_same_adapter(runs):
  from slim_jax.models import lora
  from slim_jax.train import metrics_log
  *_, tmp = runs
  two, spec_two = lora.load_peft(str(tmp / "ckpt_two_peft"))
  one, spec_one = lora.load_peft(str(tmp / "ckpt_one_peft"))
  assert spec_two == spec_one
  for a, b in zip(_leaves(two), _leaves(one), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert any(np.abs(x).max() > 0 for x in _leaves(two))
  # Process 0 alone wrote the run's logs: the same lines as the one-process run, one
  # TensorBoard file.
  lines_two = metrics_log.read_metrics(str(tmp / "ckpt_two_run" / "logs"))
  lines_one = metrics_log.read_metrics(str(tmp / "ckpt_one_run" / "logs"))
  assert [r["step"] for r in lines_two] == [r["step"] for r in lines_one]
  events = [f for f in os.listdir(tmp / "ckpt_two_run" / "logs") if "tfevents" in f]
  assert len(events) == 1
  assert sorted(os.listdir(tmp / "ckpt_two_run" / "checkpoints")) == sorted(
      os.listdir(tmp / "ckpt_one_run" / "checkpoints"))


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(runs):
  two, _, restored, _ = runs
  assert restored["step"] == 3 and restored["meta"] == {"step": 3}
  for a, b in zip(_leaves(restored["lora"]), _leaves(two["lora"]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_flag_errors_are_actionable():
  with pytest.raises(ValueError, match="go together"):
    distributed.initialize("127.0.0.1:1234", None, 0)
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize("127.0.0.1:1234", 2, 5)
  assert distributed.initialize(None, None, None, auto=False) is False
