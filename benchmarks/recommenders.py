r"""Backbones on MovieLens-100k: our jitted Flax training and scoring vs RecBole 1.2.1.

Both sides train GRU4Rec, SASRec and SR-GNN on the same ml-100k files with the same
protocol: no filtering, chronological leave-one-out, max length 50, hidden size 64,
full-softmax cross-entropy (RecBole `loss_type: CE`), valid and test users ranked
against 100 uniformly sampled negatives (`uni100`; each side samples its own), early
stopping on valid NDCG@10 with the same patience. Training batches differ by design:
RecBole trains on each prefix as its own example (2048 a batch, its default); we train on
windows of up to 50 transitions (256 a batch), every transition once per pass either way.

Per backbone, rows:
  - seconds per pass over all training interactions (median of alternating repeats after
    one warm-up pass each, which also compiles our step);
  - wall-clock seconds from a fresh model to the epoch with the best valid NDCG@10 (ours
    includes compiling), and the test NDCG@10 each side's best checkpoint reaches (one run
    each);
  - seconds to evaluate all test users (median of alternating repeats after a warm-up);
  - peak resident memory of the process that did all of the above.

Each side runs in its own worker process (benchmarks/_worker.py): ours in this venv,
RecBole in its own (`.venv-recbole`, numpy < 2, built by benchmarks/setup_recbole.sh), driven
alternately.
`--quick` keeps the first 100 users (both sides read the same reduced files), SASRec
only, one timed repeat, at most 3 epochs with patience 1.

  .venv/bin/python benchmarks/recommenders.py --quick [--out results.json]
  .venv/bin/python benchmarks/recommenders.py --models=gru4rec,sasrec,srgnn --out r.json
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:0] = [_HERE, _ROOT]  # _common, _worker, and slim_jax without installing
import _common  # noqa: E402  pylint: disable=wrong-import-position
import _worker  # noqa: E402  pylint: disable=wrong-import-position

BACKBONES = ("gru4rec", "sasrec", "srgnn")
DEFAULT_PEER_PYTHON = os.path.join(_ROOT, ".venv-recbole", "bin", "python")
QUICK_USERS = 100
# glibc returns every large freed block to the kernel (mmap/munmap), so RecBole's batches of
# 2048 x 50 activations page-fault afresh each step: SASRec's one-core step takes 4.4 s
# with glibc's defaults, 2.1 s with these (ours: 5.5 s an epoch either way). Both sides run
# with them so that the peer is measured at its best.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


# ------------------------------------------------------------------ our worker process


class Ours:
  """The project's side: the same steps as experiments/train_recommender.py."""

  def setup(self, model: str, data_dir: str, workdir: str, max_len: int = 50,
            hidden_size: int = 64, epochs: int = 200, patience: int = 10,
            batch_size: int = 256) -> dict:
    import jax
    import optax
    import jax.numpy as jnp
    from slim_jax import sharding
    from slim_jax.data import prepare, sequences
    from slim_jax.recommenders import registry
    from slim_jax.train import loop, state as state_lib, steps
    self.jax, self.loop, self.sequences = jax, loop, sequences
    self.workdir = workdir
    self.data = prepare.prepare_or_load("ml-100k", data_dir, workdir, core=0, max_len=max_len)
    self.negatives = sequences.load_negatives(prepare.prepared_dir(workdir))
    self.model = registry.make_recommender(model, num_items=self.data.num_items,
                                           max_len=max_len, hidden_size=hidden_size)
    self.config = loop.TrainConfig(loss="ce", epochs=epochs, patience=patience,
                                   batch_size=batch_size, max_len=max_len, progress=False)
    mesh = sharding.make_mesh("")
    tx = optax.adam(self.config.learning_rate)
    example = lambda: (jnp.zeros((batch_size, max_len), jnp.int32),
                       jnp.zeros((batch_size,), jnp.int32))
    self.state, shardings = state_lib.create_train_state(
        self.model, tx, example, jax.random.PRNGKey(0), mesh)
    self.step = steps.make_train_step(self.model, tx, "ce", mesh, shardings)
    self.eval_fns = steps.make_eval_fns(self.model, mesh, shardings.params)
    self.batcher = sequences.TrainBatcher(self.data, max_len, batch_size, seed=0)
    self.test_set = sequences.eval_set(self.data, "test", self.negatives, max_len)
    self.passes = 0
    return {"users": self.data.num_users, "items": self.data.num_items,
            "interactions": self.data.num_interactions,
            "train_examples": self.batcher.num_transitions, "jax": jax.__version__}

  def epoch(self) -> dict:
    start = time.perf_counter()
    rng = self.jax.random.PRNGKey(1)
    metrics = None
    for batch in self.batcher.epoch(self.passes):
      batch = {k: batch[k] for k in ("inputs", "targets", "negatives", "users")}
      self.state, metrics = self.step(self.state, batch, rng)
    self.jax.block_until_ready(metrics)
    self.passes += 1
    return {"seconds": time.perf_counter() - start}

  def evaluate(self) -> dict:
    start = time.perf_counter()
    test = self.loop.evaluate(self.eval_fns, self.state.params, self.test_set,
                              batch_size=self.config.eval_batch_size, mode="sampled",
                              num_items=self.data.num_items)
    return {"seconds": time.perf_counter() - start, "test": test}

  def fit(self) -> dict:
    run_dir = tempfile.mkdtemp(prefix="fit_", dir=self.workdir)
    result = self.loop.train_and_evaluate(self.model, self.data, self.negatives, self.config,
                                          run_dir, name="ours", log=lambda *_: None)
    return {"time_to_best_seconds": result["time_to_best_seconds"],
            "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
            "total_seconds": result["total_seconds"],
            "valid_ndcg@10": result["valid"]["ndcg@10"], "test": result["test"]}


# ----------------------------------------------------------------------------- driver


SUBSET_NAME = "ml-100k-subset"


def subset_ml100k(source: str, target_root: str, num_users: int) -> tuple[str, str]:
  """Copies ml-100k keeping the interactions of the first `num_users` users (by numeric id).

  Returns (our --data_dir, RecBole's dataset name). RecBole reads its bundled copy for the
  name 'ml-100k' whatever data_path says, so the subset goes under another name; the
  same files are linked under the names our loader reads.
  """
  folder = os.path.join(target_root, SUBSET_NAME)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(source, "ml-100k.inter"), encoding="utf-8") as f:
    header, *lines = f.read().splitlines()
  users = sorted({int(line.split("\t", 1)[0]) for line in lines})[:num_users]
  keep = {str(u) for u in users}
  with open(os.path.join(folder, f"{SUBSET_NAME}.inter"), "w", encoding="utf-8") as f:
    f.write("\n".join([header] + [x for x in lines if x.split("\t", 1)[0] in keep]) + "\n")
  with open(os.path.join(source, "ml-100k.item"), "rb") as src, \
       open(os.path.join(folder, f"{SUBSET_NAME}.item"), "wb") as dst:
    dst.write(src.read())
  for ext in ("inter", "item"):
    os.symlink(f"{SUBSET_NAME}.{ext}", os.path.join(folder, f"ml-100k.{ext}"))
  return folder, SUBSET_NAME


def peer_problem(python: str) -> str | None:
  """Why RecBole cannot run, or None."""
  if not os.path.exists(python):
    return (f"{python} does not exist: run benchmarks/setup_recbole.sh (recbole==1.2.1 "
            "--no-deps, torch==2.13.0, numpy<2 and its small dependencies)")
  probe = subprocess.run([python, "-c", "import recbole, torch; print(recbole.__version__)"],
                         capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    return f"`{python} -c 'import recbole'` failed: {probe.stderr.strip()[-500:]}"
  if probe.stdout.strip() != "1.2.1":
    return f"{python} has recbole {probe.stdout.strip()}, not 1.2.1"
  return None


def bench_model(name: str, args, data_dir: str, dataset: str, workdir: str,
                details: dict) -> list[_common.Row]:
  """The rows of one backbone; its setup and fit results go into `details[name]`."""
  setup = dict(model=name, epochs=args.epochs, patience=args.patience)
  ours = _worker.Worker([sys.executable, os.path.abspath(__file__), "--worker"],
                        log_path=os.path.join(workdir, f"{name}_ours.log"), env=MALLOC_ENV)
  peer = _worker.Worker([args.recbole_python, os.path.join(_HERE, "recbole_peer.py")],
                        log_path=os.path.join(workdir, f"{name}_recbole.log"),
                        cwd=workdir,  # RecBole writes log/ and log_tensorboard/ there
                        env=MALLOC_ENV)
  try:
    info_ours = ours.call("setup", data_dir=data_dir,
                          workdir=os.path.join(workdir, f"{name}_ours"), **setup)
    info_peer = peer.call("setup", data_path=os.path.dirname(data_dir), dataset=dataset,
                          **setup)
    print(f"{name}: ours {info_ours}\n{name}: recbole {info_peer}", flush=True)
    details[name] = {"ours": {"setup": info_ours}, "recbole": {"setup": info_peer}}
    n = info_ours["train_examples"]
    users = info_ours["users"]
    epoch = _common.alternate(lambda: ours.call("epoch"), lambda: peer.call("epoch"),
                              repeats=args.repeats)
    evaluate = _common.alternate(lambda: ours.call("evaluate"), lambda: peer.call("evaluate"),
                                 repeats=args.repeats)
    rows = [_common.Row.cost(f"{name}: pass over {n} training interactions", "s", *epoch),
            _common.Row.cost(f"{name}: evaluate {users} test users (101 candidates)", "s",
                             *evaluate)]
    if not args.skip_fit:
      fit_ours, fit_peer = ours.call("fit"), peer.call("fit")
      print(f"{name}: ours fit {fit_ours}\n{name}: recbole fit {fit_peer}", flush=True)
      details[name]["ours"]["fit"], details[name]["recbole"]["fit"] = fit_ours, fit_peer
      label = f"patience {args.patience}, at most {args.epochs} epochs"
      rows += [
          _common.Row.cost(f"{name}: time to best valid NDCG@10 ({label})", "s",
                           fit_ours["time_to_best_seconds"], fit_peer["time_to_best_seconds"]),
          _common.Row.rate(f"{name}: test NDCG@10 of the best checkpoint", "ndcg",
                           fit_ours["test"]["ndcg@10"], fit_peer["test"]["ndcg@10"])]
    mib = lambda w: w.call("peak_rss")["bytes"] / 2**20
    rows.append(_common.Row.cost(f"{name}: peak memory of the process", "MiB",
                                 mib(ours), mib(peer)))
    return rows
  finally:
    ours.close()
    peer.close()


def main():
  if "--worker" in sys.argv[1:]:
    worker = Ours()
    _worker.serve({"setup": worker.setup, "epoch": worker.epoch,
                   "evaluate": worker.evaluate, "fit": worker.fit})
    return
  extra, rest = _extra_flags().parse_known_args(sys.argv[1:])
  args = _common.parse_args(__doc__.split("\n\n")[0], rest)
  vars(args).update(vars(extra))
  models = args.models.split(",") if args.models else (
      ["sasrec"] if args.quick else list(BACKBONES))
  unknown = [m for m in models if m not in BACKBONES]
  if unknown:
    raise SystemExit(f"--models: unknown {unknown}; choose from {','.join(BACKBONES)}")
  if args.quick:
    args.users = args.users or QUICK_USERS
    args.epochs = min(args.epochs, 3)
    args.patience = min(args.patience, 1)
    if not any(a.startswith("--repeats") for a in rest):
      args.repeats = 1  # RecBole scores each candidate with its own forward pass: slow
  problem = peer_problem(args.recbole_python)
  if problem:
    print(f"RecBole 1.2.1 (the peer) cannot run, so nothing is compared: {problem}")
    _common.report("recommenders", [], args.out)
    raise SystemExit(1)
  from slim_jax.data import movielens
  source = movielens.fetch()
  workdir = tempfile.mkdtemp(prefix="bench_recommenders_")
  # The full ml-100k: RecBole's bundled copy, the same files as ours (both from its wheel).
  data_dir, dataset = (subset_ml100k(source, os.path.join(workdir, "data_src"), args.users)
                       if args.users else (source, "ml-100k"))
  print(f"logs and data in {workdir}", flush=True)
  rows, details = [], {"cpus": len(os.sched_getaffinity(0)), "users": args.users or "all"}
  for name in models:
    rows += bench_model(name, args, data_dir, dataset, workdir, details)
  _common.report("recommenders", rows, args.out, details)


def _extra_flags():
  """Flags beyond _common's --quick/--out/--repeats."""
  import argparse
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--models", default="", help="comma list (default: all; --quick: sasrec)")
  parser.add_argument("--users", type=int, default=0, help="keep the first N users (0: all)")
  parser.add_argument("--epochs", type=int, default=200, help="epoch cap of the timed fits")
  parser.add_argument("--patience", type=int, default=10, help="early-stopping patience")
  parser.add_argument("--skip_fit", action="store_true", help="skip the time-to-best rows")
  parser.add_argument("--recbole_python", default=DEFAULT_PEER_PYTHON,
                      help="python of RecBole 1.2.1's venv")
  return parser


if __name__ == "__main__":
  main()
