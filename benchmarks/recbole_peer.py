"""RecBole 1.2.1's side of benchmarks/recommenders.py: a worker run in RecBole's own venv.

  .venv-recbole/bin/python benchmarks/recbole_peer.py   (driven through benchmarks/_worker.py)

Same protocol as the project's side: ml-100k with no filtering, chronological
leave-one-out (`LS: valid_and_test`, `order: TO`, grouped by user), valid and test users
ranked against 100 uniformly sampled negatives (`uni100`), max length 50, hidden size 64,
full-softmax cross-entropy (`loss_type: CE`), early stopping on valid NDCG@10. Everything
else is RecBole's default (batch 2048 prefixes, Adam 1e-3, its own seed 2020 unless told).

Two adjustments needed to run RecBole 1.2.1 here, neither changing its results:
importing it switches on autograd anomaly detection (its `sine.py`), which slows
training 1.36x, so it is switched off again; torch >= 2.6 loads checkpoints with
`weights_only=True`, which RecBole's own checkpoints (they hold its config) fail, so the
best checkpoint is loaded with `weights_only=False`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _worker  # noqa: E402

MODELS = {"gru4rec": "GRU4Rec", "sasrec": "SASRec", "srgnn": "SRGNN"}


class Peer:
  def __init__(self):
    self.trainer = None

  def setup(self, model: str, data_path: str, dataset: str = "ml-100k", max_len: int = 50, hidden_size: int = 64,
            epochs: int = 200, patience: int = 10, seed: int = 2020, threads: int = 0) -> dict:
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed
    torch.autograd.set_detect_anomaly(False)
    if threads:
      torch.set_num_threads(threads)
    self.checkpoints = tempfile.mkdtemp(prefix="recbole_ckpt_")
    # For 'ml-100k' RecBole reads the copy inside its wheel, whatever data_path says.
    config = Config(model=MODELS[model], dataset=dataset, config_dict={
        "data_path": data_path, "checkpoint_dir": self.checkpoints,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": max_len, "hidden_size": hidden_size,
        "embedding_size": hidden_size, "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                      "mode": {"valid": "uni100", "test": "uni100"}},
        "metrics": ["NDCG", "Hit"], "topk": [10, 20], "valid_metric": "NDCG@10",
        "epochs": epochs, "stopping_step": patience, "eval_step": 1, "seed": seed,
        "use_gpu": False, "device": "cpu", "show_progress": False, "state": "WARNING",
        "log_wandb": False})
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    self.train_data, self.valid_data, self.test_data = data_preparation(config, dataset)
    self.config, self._get_model, self._get_trainer = config, get_model, get_trainer
    self.fresh()
    torch.autograd.set_detect_anomaly(False)
    return {"users": dataset.user_num - 1, "items": dataset.item_num - 1,
            "interactions": len(dataset.inter_feat),
            "train_examples": len(self.train_data.dataset),
            "torch": torch.__version__}

  def fresh(self) -> dict:
    """A newly initialised model and trainer."""
    from recbole.utils import init_seed
    init_seed(self.config["seed"], self.config["reproducibility"])
    model = self._get_model(self.config["model"])(self.config, self.train_data._dataset)
    self.trainer = self._get_trainer(self.config["MODEL_TYPE"], self.config["model"])(
        self.config, model)
    return {}

  def epoch(self) -> dict:
    """One pass over every training example (every prefix of every training sequence)."""
    start = time.perf_counter()
    self.trainer._train_epoch(self.train_data, 0, show_progress=False)
    return {"seconds": time.perf_counter() - start}

  def evaluate(self) -> dict:
    """Scores every test user's 101 candidates with the current parameters."""
    start = time.perf_counter()
    result = self.trainer.evaluate(self.test_data, load_best_model=False, show_progress=False)
    return {"seconds": time.perf_counter() - start, "test": _metrics(result)}

  def fit(self) -> dict:
    """Early-stopped training from a fresh model; the best checkpoint scored on test."""
    import torch
    self.fresh()
    marks = {}
    start = time.perf_counter()

    def on_epoch(epoch, valid_score):
      marks["epochs"] = epoch + 1
      if self.trainer.cur_step == 0:  # early_stopping just took a new best
        marks["best_epoch"], marks["time_to_best"] = epoch + 1, time.perf_counter() - start

    self.trainer.fit(self.train_data, self.valid_data, saved=True, show_progress=False,
                     verbose=False, callback_fn=on_epoch)
    total = time.perf_counter() - start
    checkpoint = torch.load(self.trainer.saved_model_file, map_location="cpu",
                            weights_only=False)
    self.trainer.model.load_state_dict(checkpoint["state_dict"])
    test = self.trainer.evaluate(self.test_data, load_best_model=False, show_progress=False)
    return {"time_to_best_seconds": marks["time_to_best"], "best_epoch": marks["best_epoch"],
            "epochs_run": marks["epochs"], "total_seconds": total,
            "valid_ndcg@10": float(self.trainer.best_valid_score), "test": _metrics(test)}


def _metrics(result) -> dict:
  return {k.lower(): float(v) for k, v in result.items()}


def main():
  peer = Peer()
  _worker.serve({"setup": peer.setup, "fresh": peer.fresh, "epoch": peer.epoch,
                 "evaluate": peer.evaluate, "fit": peer.fit})


if __name__ == "__main__":
  main()
