"""The GGUF tokenizer without torch: the run-time path of a fresh `scripts/setup.sh` install.

The child process blocks torch before anything imports it, loads the real SmolLM2 GGUF with
`llama.load_pretrained`, renders a teacher prompt's chat template, generates a few tokens
and encodes a set of strings; the parent checks those ids against transformers' own GGUF
loader (`AutoTokenizer(..., gguf_file=)`, which needs torch: only the test venv has it).
"""

import json
import os
import subprocess
import sys

import pytest

from llama_fixtures import smollm2_gguf
from slim_jax.teacher import prompts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HISTORY = "1. Toy Story (1995); Animation|Children's|Comedy"
TEXTS = [
    "Toy Story (1995); Animation|Children's|Comedy",
    "  leading spaces, tabs\tand\nnew lines  ",
    "Amélie, 千と千尋の神隠し, Ærøskøbing — “quotes” 🎬",
    "<|im_start|>user\nhello<|im_end|>",
]

CHILD = r"""
import json, sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from slim_jax.models import llama
from slim_jax import generate
from slim_jax.teacher import prompts
from slim_jax.convert import gguf_llama

path, texts = sys.argv[1], json.loads(sys.argv[2])
config, params, tokenizer = llama.load_pretrained(path)
messages = prompts.PromptTemplate().render(sys.argv[3], 1)
chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
gen = generate.Generator(config, params, tokenizer, max_batch_size=1, max_seq_len=512)
out = gen.generate([chat], generate.SamplingParams(max_new_tokens=4, temperature=0.0))
cached = gguf_llama.load_tokenizer(path)  # the second load reads the cache folder
print(json.dumps({
    "torch_blocked": sys.modules["torch"] is None,
    "chat": chat,
    "ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts + [chat]],
    "cached_ids": [cached(t, add_special_tokens=False)["input_ids"] for t in texts + [chat]],
    "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                tokenizer.unk_token],
    "generated": out[0].token_ids,
    "text": out[0].text,
}))
"""


@pytest.fixture(scope="module")
def no_torch_run(tmp_path_factory):
  cache = tmp_path_factory.mktemp("slim_jax_cache")
  env = dict(os.environ, SLIM_JAX_CACHE=str(cache), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", CHILD, smollm2_gguf(), json.dumps(TEXTS), HISTORY],
                        capture_output=True, text=True, env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_tokenizer():
  import transformers
  path = smollm2_gguf()
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))


def test_smollm2_gguf_loads_renders_and_generates_without_torch(no_torch_run):
  assert no_torch_run["torch_blocked"]
  assert no_torch_run["chat"].startswith("<|im_start|>system\n")
  assert no_torch_run["chat"].endswith("<|im_start|>assistant\n")
  assert no_torch_run["special"] == ["<|im_start|>", "<|im_end|>", "<|im_end|>",
                                     "<|endoftext|>"]
  assert len(no_torch_run["generated"]) == 4 and no_torch_run["text"].strip()


def test_token_ids_equal_transformers_gguf_loader(no_torch_run):
  ref = reference_tokenizer()
  strings = TEXTS + [no_torch_run["chat"]]
  want = [ref(t, add_special_tokens=False)["input_ids"] for t in strings]
  assert no_torch_run["ids"] == want
  assert no_torch_run["cached_ids"] == want
  assert no_torch_run["chat"] == ref.apply_chat_template(
      prompts.PromptTemplate().render(HISTORY, 1), tokenize=False, add_generation_prompt=True)
