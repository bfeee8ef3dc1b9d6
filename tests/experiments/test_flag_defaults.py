"""A flag that sets a config field has that field's default (the dataclass is the one
source of defaults). Checked in a child process: each script defines its flags globally."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/experiments"]
import distill as script
from slim_jax import config_flags
from slim_jax.train import distill
fresh = distill.DistillConfig()  # the dataclass's own defaults, not the script's copy
out = {}
for flag, path in script.CONFIG_FIELDS.items():
  want = config_flags.default(fresh, path)
  have = script.FLAGS[flag].default
  out[flag] = [list(want) if isinstance(want, tuple) else want, have]
print(json.dumps(out))
"""


def test_distill_flag_defaults_are_the_distill_config_fields():
  proc = subprocess.run([sys.executable, "-c", CHILD, ROOT], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  pairs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(pairs) >= 19
  differ = {flag: pair for flag, pair in pairs.items() if pair[0] != pair[1]}
  assert not differ, f"flag default != DistillConfig field: {differ}"


def test_override_rebuilds_nested_fields():
  from slim_jax import config_flags
  from slim_jax.train import distill
  config = config_flags.override(distill.DistillConfig(), {"lora.rank": 4, "max_length": 64})
  assert config.lora.rank == 4 and config.max_length == 64
  assert config.lora.dropout == distill.DistillConfig().lora.dropout


GENERATE_CHILD = r"""
import dataclasses, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/experiments"]
import generate_rationales as script
from slim_jax.pipeline import stages
fields = {f.name: f.default for f in dataclasses.fields(stages.GenerateConfig)}
print(json.dumps({name: [fields[name], script.FLAGS[name].default]
                  for name in script.CONFIG_FIELDS}))
"""


def test_generate_rationales_flag_defaults_are_the_generate_config_fields():
  proc = subprocess.run([sys.executable, "-c", GENERATE_CHILD, ROOT], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  pairs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(pairs) == 6 and all(want == have for want, have in pairs.values()), pairs
