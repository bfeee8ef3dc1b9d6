"""A flag that sets a config field has that field's default (the dataclass is the one
source of defaults). Each script is imported in a child process: scripts define their
flags globally, so two cannot share one process."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# script -> (config class as module:Name, how to build one with its defaults)
SCRIPTS = {
    "distill": ("slim_jax.train.distill:DistillConfig", "{}"),
    "generate_rationales": ("slim_jax.pipeline.stages:GenerateConfig",
                            "{'student': '', 'adapter': None}"),
    "train_recommender": ("slim_jax.train.loop:TrainConfig", "{}"),
    "teacher": ("slim_jax.teacher.client:ClientConfig", "{}"),
    "encode": ("slim_jax.pipeline.stages:EncodeConfig", "{}"),
    "run_slim": ("slim_jax.train.grid:GridSpec",
                 "{'backbones': (), 'variants': (), 'seeds': (), 'epochs': 1, 'patience': 1, "
                 "'hidden': 1, 'batch': 1, 'max_len': 1}"),
}
# Scripts whose flags set only a few fields (the rest come from presets).
MIN_FIELDS = {"run_slim": 2}

CHILD = r"""
import ast, importlib, json, sys
root, script, config_path, kwargs = sys.argv[1:5]
sys.path[:0] = [root, root + "/experiments"]
module = importlib.import_module(script)
from slim_jax import config_flags
module_name, class_name = config_path.split(":")
fresh = getattr(importlib.import_module(module_name), class_name)(**ast.literal_eval(kwargs))
fields = module.CONFIG_FIELDS
if not isinstance(fields, dict):
  fields = {name: name for name in fields}
out = {}
for flag, path in fields.items():
  want = config_flags.default(fresh, path)
  out[flag] = [list(want) if isinstance(want, tuple) else want, module.FLAGS[flag].default]
print(json.dumps(out))
"""


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_flag_defaults_are_the_config_fields(script):
  config_path, kwargs = SCRIPTS[script]
  proc = subprocess.run([sys.executable, "-c", CHILD, ROOT, script, config_path, kwargs],
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  pairs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(pairs) >= MIN_FIELDS.get(script, 6)
  differ = {flag: pair for flag, pair in pairs.items() if pair[0] != pair[1]}
  assert not differ, f"{script}: flag default != config field: {differ}"


def test_override_rebuilds_nested_fields():
  from slim_jax import config_flags
  from slim_jax.train import distill
  config = config_flags.override(distill.DistillConfig(), {"lora.rank": 4, "max_length": 64})
  assert config.lora.rank == 4 and config.max_length == 64
  assert config.lora.dropout == distill.DistillConfig().lora.dropout
