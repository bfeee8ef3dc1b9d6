"""requirements.txt (the tested pins) and pyproject.toml (what `pip install .` gets) agree."""

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _name(spec: str) -> str:
  return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def requirements_txt() -> dict[str, str]:
  with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
    lines = [l.split("#", 1)[0].strip() for l in f]
  return {_name(l): l.replace(" ", "") for l in lines if l}


def pyproject_dependencies() -> dict[str, str]:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  return {_name(d): d.replace(" ", "") for d in deps}


def test_pyproject_declares_the_tested_runtime_pins():
  assert pyproject_dependencies() == requirements_txt()


def test_no_test_only_package_at_run_time():
  assert not {"torch", "peft", "sentence-transformers", "accelerate"} & set(requirements_txt())
