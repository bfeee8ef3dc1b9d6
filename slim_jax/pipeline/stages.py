"""Stages of a SLIM run as library functions: each takes the run's layout and that stage's
frozen config. experiments/run_slim.py calls them in its own process; the stage scripts
(experiments/teacher.py, distill.py, generate_rationales.py, encode.py) are absl wrappers
over them.

  stages.teacher(RunLayout(w), stages.TeacherConfig(client=ClientConfig(base_url=...)), key)
  stages.distill(RunLayout(w), stages.DistillStageConfig(init_from=..., train=DistillConfig()))
  stages.generate(RunLayout(w), stages.GenerateConfig(student=..., adapter=...))
  stages.encode(RunLayout(w), stages.EncodeConfig())

The one process boundary is the point of it: the teacher model runs behind an
OpenAI-compatible server (python -m slim_jax.serve), like any paid endpoint would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

from slim_jax import io
from slim_jax.pipeline.layout import RunLayout
from slim_jax.teacher import prompts


# ----------------------------------------------------------------------------- generate

@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """The student writes every user's rationales (SLIM step 3), one per kind of
  teacher/prompts.py."""
  student: str  # Hugging Face LLaMA folder or .gguf
  adapter: str | None  # PEFT LoRA folder; None: the base student
  max_new_tokens: int = 256
  batch_size: int = 32  # most users per batch; batches are balanced
  max_seq_len: int = 2048  # prompt plus rationale tokens per row
  max_history: int = prompts.DEFAULT_MAX_HISTORY
  num_users: int = 0  # only the first N users (0: every user)
  temperature: float = 0.0  # 0 = greedy
  kinds: tuple[str, ...] = prompts.KINDS
  holdout: int = prompts.DEFAULT_RATIONALE_HOLDOUT  # training items after a 'train' cutoff
  dtype: str = "float32"  # weights and products; slim_jax/precision.py picks the fast one

  def fingerprint(self) -> str:
    """What a rationale depends on besides its prompt: the student (file identity), the
    adapter's contents and the generation settings."""
    identity = {"student": os.path.abspath(self.student),
                "student_files": io.stat_signature(self.student),
                "adapter": io.hash_path(self.adapter) if self.adapter else None,
                "max_new_tokens": self.max_new_tokens, "max_seq_len": self.max_seq_len,
                "temperature": self.temperature, "dtype": self.dtype}
    return io.fingerprint(identity)


def generate(layout: RunLayout, config: GenerateConfig, fingerprint: str | None = None) -> int:
  """Appends one record per user and kind of teacher/prompts.py (KINDS) to
  rationales/student.jsonl ('eval') and student_train.jsonl ('train'), each carrying its
  cutoff and `fingerprint` (default: `config.fingerprint()`); returns how many records were
  written.

  Resumable: records already there under the same fingerprint and prompt are kept; records
  of another fingerprint or prompt are dropped and written again; a torn last line is cut;
  duplicates are dropped."""
  from slim_jax import generator_loading  # pylint: disable=import-outside-toplevel
  from slim_jax.data import dataset as dataset_lib  # pylint: disable=import-outside-toplevel
  from slim_jax.generate import SamplingParams, balanced_batch_size  # pylint: disable=import-outside-toplevel
  from slim_jax.teacher import rationales  # pylint: disable=import-outside-toplevel
  if not os.path.exists(layout.data):
    raise FileNotFoundError(f"{layout.data} is missing: prepare the data first "
                            "(experiments/prepare_data.py)")
  if config.adapter is not None and not os.path.isdir(config.adapter):
    raise FileNotFoundError(f"adapter {config.adapter} does not exist: run "
                            "experiments/distill.py first, or generate with the base student "
                            "(generate_rationales.py --adapter=none)")
  fingerprint = fingerprint or config.fingerprint()
  data = dataset_lib.load(layout.data)
  users = range(data.num_users if config.num_users <= 0
                else min(config.num_users, data.num_users))
  jobs = []  # (kind, user, cutoff, messages) not yet on disk
  for kind in config.kinds:
    out = layout.rationale_file(prompts.source_name("student", kind))
    cut = {u: prompts.cutoff(data, u, kind, config.holdout) for u in users}
    messages_of = {u: prompts.build_messages(data, u, max_history=config.max_history,
                                             cutoff=cut[u]) for u in users}
    done = set()
    if os.path.exists(out):
      stale = rationales.dedupe(out, keep=lambda r, m=messages_of: r.get(
          "fingerprint") == fingerprint and (r["user_id"] not in m or
                                             r["messages"] == m[r["user_id"]]))
      if stale:
        logging.warning("%s: dropped %d rationales made from another student, adapter, "
                        "flag or prompt; writing them again", out, stale)
      done = rationales.done_users(out)
    jobs += [(kind, u, cut[u], messages_of[u]) for u in users if u not in done]
    logging.info("student %s rationales: %d users, %d already in %s", kind, len(users),
                 len(done), out)
  if not jobs:
    return 0
  batch_size = balanced_batch_size(len(jobs), config.batch_size)
  generator, name = generator_loading.load_generator(
      config.student, config.adapter, batch_size, config.max_seq_len, config.dtype,
      pad_batches=True)
  sampling = SamplingParams(max_new_tokens=config.max_new_tokens,
                            temperature=config.temperature)
  # Batches of prompts of similar length: a batch is padded to its longest prompt.
  jobs = sorted(((generator.chat_ids(job[3]), job) for job in jobs), key=lambda x: len(x[0]))
  start = time.perf_counter()
  sinks = {kind: rationales.Appender(layout.rationale_file(prompts.source_name("student", kind)))
           for kind in config.kinds}
  try:
    for i in range(0, len(jobs), batch_size):
      batch = jobs[i:i + batch_size]
      completions = generator.generate([ids for ids, _ in batch], sampling)
      for (_, (kind, u, cut, m)), c in zip(batch, completions):
        sinks[kind].append({**rationales.make_record(
            user_id=u, messages=m, response=c.text,
            model=name + ("+lora" if config.adapter else ""),
            prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
            finish_reason=c.finish_reason, cutoff=cut), "fingerprint": fingerprint})
      done_n = i + len(batch)
      rate = done_n / (time.perf_counter() - start)
      logging.info("student rationales %d/%d (%.2f rationales/s, about %.0f s left)", done_n,
                   len(jobs), rate, (len(jobs) - done_n) / rate)
  finally:
    for sink in sinks.values():
      sink.close()
  return len(jobs)


# ----------------------------------------------------------------------------- encode

@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """BERT vectors of item descriptions and rationales (slim_jax/encode.py)."""
  encoder: str | None = None  # BERT folder; None: all-MiniLM-L6-v2 (slim_jax/assets.py)
  pooling: str | None = None  # None: the folder's 1_Pooling/config.json, else mean
  normalize: bool | None = None  # None: when the folder's modules.json has Normalize
  batch_size: int = 64
  max_length: int | None = None  # None: sentence_bert_config.json, else the model's
  sources: tuple[str, ...] | None = None  # None: every rationale file present
  dtype: str = "float32"
  skip_bad_lines: bool = False
  progress: bool = True


def encode(layout: RunLayout, config: EncodeConfig) -> dict:
  """Writes embeddings/*.npy and manifest.json; returns the summary of encode.run_stage."""
  from slim_jax import assets  # pylint: disable=import-outside-toplevel
  from slim_jax import encode as encode_lib  # pylint: disable=import-outside-toplevel
  encoder = encode_lib.TextEncoder(
      config.encoder or assets.minilm_folder(), pooling=config.pooling,
      normalize=config.normalize, max_length=config.max_length,
      batch_size=config.batch_size, dtype=config.dtype)
  return encode_lib.run_stage(layout.workdir, encoder, sources=config.sources,
                              skip_bad_lines=config.skip_bad_lines, progress=config.progress)


# ----------------------------------------------------------------------------- teacher

@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Chain-of-thought rationales r'_u for a seeded subset U' of users (SLIM step 1), from
  any OpenAI-compatible endpoint (`client`): for each user one rationale per kind of
  teacher/prompts.py (KINDS: 'eval' from the whole training prefix into teacher.jsonl,
  'train' from the prefix up to its cutoff into teacher_train.jsonl)."""
  client: Any  # slim_jax.teacher.client.ClientConfig
  dataset: str = "ml-100k"
  data_dir: str | None = None
  num_users: int = 0  # size of U' (seeded); 0: every user
  seed: int = 0  # for choosing U'
  max_history: int = prompts.DEFAULT_MAX_HISTORY
  template: str | None = None  # prompt template file; None: the built-in three-step prompt
  price: tuple[float, float] = (0.0, 0.0)  # USD per million input, output tokens
  kinds: tuple[str, ...] = prompts.KINDS
  holdout: int = prompts.DEFAULT_RATIONALE_HOLDOUT  # training items after a 'train' cutoff


class TeacherLocked(RuntimeError):
  """Another teacher run holds this workdir's rationale file."""


def teacher_template(config: TeacherConfig) -> prompts.PromptTemplate:
  return (prompts.load_template(config.template) if config.template
          else prompts.PromptTemplate())


@dataclasses.dataclass(frozen=True)
class TeacherRequest:
  user: int
  messages: list
  cutoff: int  # training-prefix items the prompt was written from


def teacher_requests(layout: RunLayout, config: TeacherConfig,
                     template: prompts.PromptTemplate | None = None
                     ) -> dict[str, list[TeacherRequest]]:
  """kind -> the requests for every user of U', in user order."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from slim_jax.data import prepare  # pylint: disable=import-outside-toplevel
  if config.num_users < 0:
    raise ValueError(f"--num_users must be >= 0, got {config.num_users}")
  template = template or teacher_template(config)
  dataset = prepare.prepare_or_load(config.dataset, config.data_dir, layout.workdir)
  users = list(range(dataset.num_users))
  if 0 < config.num_users < dataset.num_users:
    rng = np.random.default_rng(config.seed)
    users = sorted(int(u) for u in rng.choice(dataset.num_users, size=config.num_users,
                                               replace=False))
  out = {}
  for kind in config.kinds:
    requests = []
    for u in users:
      c = prompts.cutoff(dataset, u, kind, config.holdout)
      requests.append(TeacherRequest(u, prompts.build_messages(
          dataset, u, template=template, max_history=config.max_history, cutoff=c), c))
    out[kind] = requests
  return out


def _teacher_settings(config: TeacherConfig, template: prompts.PromptTemplate) -> dict:
  """What the lines in teacher.jsonl depend on besides the prompts themselves. The
  endpoint's address is left out on purpose: a resumed run may reach the same model
  elsewhere (a restarted local server picks another port)."""
  c = config.client
  return {"model": c.model, "temperature": c.temperature, "top_p": c.top_p,
          "max_tokens": c.max_tokens, "seed": c.seed, "max_history": config.max_history,
          "template_sha256": hashlib.sha256(
              (template.system + "\0" + template.user).encode("utf-8")).hexdigest()}


def _check_teacher_resume(layout: RunLayout, source: str, current: dict,
                          requests: list[TeacherRequest], fingerprint: str) -> None:
  """Refuses to mix lines made under another model, sampling, template, data or stage
  fingerprint (a paid rationale is never deleted here: the user decides)."""
  from slim_jax.teacher import rationales  # pylint: disable=import-outside-toplevel
  out, path = layout.rationale_file(source), layout.rationale_manifest(source)
  existing = rationales.by_user(rationales.read(out))
  if existing and os.path.exists(path):
    previous = io.read_json(path, "teacher manifest")
    changed = sorted(k for k in current if previous.get(k) != current[k])
    if changed:
      raise ValueError(
          f"{out} holds {len(existing)} rationales made with different settings "
          f"({', '.join(changed)} changed; see {path}). Use a new --workdir, restore the "
          "settings, or delete both files to start over.")
  foreign = sorted(u for u, r in existing.items()
                   if r.get("fingerprint", fingerprint) != fingerprint)
  if foreign:
    raise ValueError(
        f"{out}: {len(foreign)} lines (users {foreign[:5]}...) were made under another "
        f"fingerprint than this run's {fingerprint[:12]} (another pipeline run or other "
        "settings). Use a new --workdir, or delete the file to start over.")
  for request in requests:
    record = existing.get(request.user)
    if record is not None and record["messages"] != request.messages:
      raise ValueError(
          f"{out}: the line for user {request.user} was made from a different prompt (the "
          "data, --template, --max_history or --holdout changed). Use a new "
          "--workdir or delete the file.")
  io.write_json(path, current)


def teacher(layout: RunLayout, config: TeacherConfig, api_key: str | None,
            fingerprint: str | None = None):
  """Asks the endpoint for every user of U' and kind not yet in rationales/teacher.jsonl
  (teacher_train.jsonl for the training kind); writes <file>_summary.json per kind;
  returns the client's Stats summed over kinds. Every line records `fingerprint` (the
  pipeline stage's; default: the hash of the settings the lines depend on). Raises
  TeacherLocked, ValueError (settings or fingerprint differ from the lines already
  written) or client.FatalError (the endpoint refuses: a bad key, an unknown model)."""
  from slim_jax.teacher import limits  # pylint: disable=import-outside-toplevel
  template = teacher_template(config)
  requests = teacher_requests(layout, config, template)
  fingerprint = fingerprint or io.fingerprint(_teacher_settings(config, template))
  budget = limits.TokenBudget(config.client.max_total_tokens)  # one cap over every kind
  try:
    with io.exclusive_lock(layout.teacher_lock):
      total = None
      for kind, kind_requests in requests.items():
        stats = _ask_teacher(layout, config, template, kind, kind_requests, api_key,
                             fingerprint, budget)
        total = stats if total is None else total.merged(stats)
      return total
  except io.Locked as e:  # only the lock raises it
    raise TeacherLocked(f"another teacher run holds {layout.teacher_lock} (pid {e.holder}); "
                        "wait for it to finish or stop it first") from None


def _ask_teacher(layout: RunLayout, config: TeacherConfig, template, kind: str,
                 requests: list[TeacherRequest], api_key: str | None, fingerprint: str,
                 budget):
  """The body of `teacher` for one kind, under its lock."""
  from slim_jax.teacher import client, rationales  # pylint: disable=import-outside-toplevel
  source = prompts.source_name("teacher", kind)
  out = layout.rationale_file(source)
  removed = rationales.dedupe(out) if os.path.exists(out) else 0
  if removed:
    logging.warning("%s: dropped %d duplicate lines (the first line of each user is kept)",
                    out, removed)
  _check_teacher_resume(layout, source, _teacher_settings(config, template), requests,
                        fingerprint)
  logging.info("asking %s for %d %s rationales (%d users requested, seed %d)",
               config.client.base_url or "OpenAI", len(requests), kind, config.num_users,
               config.seed)
  total = len(requests)

  def progress(stats) -> None:
    done = stats.users_done + stats.users_skipped
    if stats.users_done % 10 == 0 or done == total:
      logging.info("%s: %d/%d users done (%d requests, %d retries)", kind, done, total,
                   stats.requests, stats.retries)

  stats = client.collect([(r.user, r.messages) for r in requests], out, config.client,
                         api_key, progress=progress,
                         fields={r.user: {"cutoff": r.cutoff, "fingerprint": fingerprint}
                                 for r in requests}, budget=budget)
  summary = stats.as_dict()
  summary["estimated_cost_usd"] = stats.cost(*config.price)
  summary["price_per_million_tokens"] = {"input": config.price[0], "output": config.price[1]}
  summary["output"] = out
  io.write_json(layout.rationale_summary(source), summary)
  return stats


# ----------------------------------------------------------------------------- distill

@dataclasses.dataclass(frozen=True)
class DistillStageConfig:
  """LoRA distillation of the teacher's rationales into the student (SLIM step 2).
  `train.optim.total_steps` is set here from the data: `num_steps`, or `num_epochs`
  passes over the training examples when `num_steps` is 0."""
  init_from: str  # student weights: a Hugging Face LLaMA folder or .gguf
  train: Any  # slim_jax.train.distill.DistillConfig
  rationales: str | None = None  # default: the run's rationales/teacher.jsonl
  num_epochs: int = 3
  num_steps: int = 0
  min_rationale_tokens: int = 8  # drop examples whose prompt leaves fewer
  keep_cut_rationales: bool = False  # train on rationales cut by the teacher's max_tokens
  param_dtype: str | None = None  # the frozen base's weights: None = float32, "bfloat16"
  heldout_fraction: float = 0.1
  force: bool = False  # train again from step 0, even when the adapter is up to date
  progress: bool = True


def distill(layout: RunLayout, config: DistillStageConfig) -> dict | None:
  """Trains the adapter into distill/ and exports it to distill/peft_adapter (PEFT format);
  returns the summary, or None when the adapter already matches its manifest. Resumes from
  distill/checkpoints when they were made from the same config and data. Raises ValueError
  when fewer than two examples are usable (the message says why)."""
  import shutil  # pylint: disable=import-outside-toplevel
  from slim_jax import distributed  # pylint: disable=import-outside-toplevel
  from slim_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  from slim_jax.data import rationale_examples as rx  # pylint: disable=import-outside-toplevel
  from slim_jax.models import lora  # pylint: disable=import-outside-toplevel
  from slim_jax.train import distill as distill_lib  # pylint: disable=import-outside-toplevel
  train_config = config.train
  rationales_path = config.rationales or layout.teacher_rationales
  if not os.path.exists(config.init_from):
    raise FileNotFoundError(f"--init_from={config.init_from} does not exist")
  out = layout.distill
  os.makedirs(out, exist_ok=True)
  records = rx.read_teacher_jsonl(rationales_path)
  model_config, params, tokenizer = pretrained.load_llama(config.init_from,
                                                          param_dtype=config.param_dtype)
  examples, report = rx.build_examples(records, tokenizer, train_config.max_length,
                                       config.min_rationale_tokens,
                                       keep_cut=config.keep_cut_rationales)
  main = distributed.is_main_process()  # run-level files are written once, by process 0
  if main:
    io.write_json(os.path.join(out, "truncation_report.json"), report.to_dict(), default=str)
  logging.info("distillation data: %s", report.summary())
  if len(examples) < 2:
    hint = ("raise --max_length" if report.examples_dropped.get("prompt_too_long")
            or report.examples_truncated else
            "the teacher's max_tokens cut its rationales (finish_reason 'length'): rerun the "
            "teacher with a higher --max_tokens, or pass --keep_cut_rationales"
            if report.examples_dropped.get("cut_by_max_tokens") else
            "the teacher's responses are empty: check the teacher model and rerun the teacher "
            "stage")
    raise ValueError(f"{rationales_path}: only {len(examples)} usable example(s) "
                     f"({report.summary()}); {hint}")
  train, heldout = rx.split_heldout(examples, config.heldout_fraction, train_config.seed)
  per_epoch = rx.BucketedBatches(train, train_config.batch_size, 0,
                                 rx.bucket_boundaries(train_config.max_length),
                                 train_config.seed).batches_per_epoch
  num_steps = config.num_steps or config.num_epochs * per_epoch
  train_config = dataclasses.replace(train_config, optim=dataclasses.replace(
      train_config.optim, total_steps=num_steps,
      warmup_steps=min(train_config.optim.warmup_steps, num_steps)))

  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  manifest = {"init_from": os.path.abspath(config.init_from),
              "rationales": os.path.abspath(rationales_path),
              "fingerprint": distill_lib.fingerprint(train_config, examples, model_config),
              "config": dataclasses.asdict(train_config)}
  manifest_path = os.path.join(out, "manifest.json")
  adapter_dir = layout.adapter
  if (not config.force and os.path.exists(manifest_path)
      and os.path.exists(os.path.join(adapter_dir, lora.PEFT_WEIGHTS_FILE))):
    try:
      previous = io.read_json(manifest_path, "distillation manifest")
    except ValueError:
      previous = {}
    if previous.get("fingerprint") == manifest["fingerprint"]:
      logging.info("%s matches %s: nothing to do (--force trains again)", adapter_dir,
                   manifest_path)
      return None
  if config.force and main:  # from scratch: no checkpoint of an earlier run is resumed
    for stale in (distill_lib.CHECKPOINT_DIR, distill_lib.LOG_DIR):
      shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
  distributed.barrier("distill stage: ready to train")
  logging.info("%d train / %d held-out examples, %d steps (%d per epoch), LoRA %s",
               len(train), len(heldout), num_steps, per_epoch, train_config.lora)
  start = time.time()
  result = distill_lib.train_and_evaluate(train_config, model_config, params, train, heldout,
                                          pad_id, out, progress=config.progress)
  if main:
    lora.save_peft(adapter_dir, result.lora, train_config.lora,
                   base_model_name_or_path=os.path.abspath(config.init_from),
                   num_layers=model_config.num_hidden_layers)
  summary = {"steps": result.final_step, "final_loss": result.final_loss,
             "initial_heldout_nll": result.initial_heldout_nll,
             "final_heldout_nll": result.final_heldout_nll,
             "resumed_from": result.resumed_from, "seconds_this_run": time.time() - start,
             "train_examples": len(train), "heldout_examples": len(heldout),
             "adapter_parameters": lora.num_parameters(result.lora),
             "adapter": adapter_dir}
  if main:
    io.write_json(os.path.join(out, "summary.json"), summary, default=str)
    io.write_json(manifest_path, manifest, default=str)
  distributed.barrier("distill stage: adapter written")
  return summary


def distill_summary_line(summary: dict) -> str:
  nll = ("no held-out examples" if summary["final_heldout_nll"] is None else
         f"held-out NLL {summary['initial_heldout_nll'] or float('nan'):.4f} -> "
         f"{summary['final_heldout_nll']:.4f}")
  return f"distilled {summary['steps']} steps ({nll}); adapter in {summary['adapter']}"
