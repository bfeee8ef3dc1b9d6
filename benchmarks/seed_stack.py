r"""The grid's seeds trained together (slim_jax/train/seed_stack.py) vs one after another
(slim_jax/train/loop.py), on MovieLens-100k.

Per backbone, one row: wall-clock seconds from fresh models to every seed's test metrics
(compilation included, as the grid pays it), S seeds for E epochs each (patience E, so no
seed stops early and both sides do the same work). "ours" is the stack, "peer" the
one-seed loop run once per seed; both are this project's code (the stack's reference,
which tests/train/test_seed_stack.py proves it equals). One run each, alternating.

  .venv/bin/python benchmarks/seed_stack.py --quick          # GRU4Rec, 120 users, 3 seeds
  .venv/bin/python benchmarks/seed_stack.py --out docs/results/seed_stack_bench.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import _common  # noqa: E402  pylint: disable=wrong-import-position

BACKBONES = ("gru4rec", "sasrec", "srgnn")


def main() -> None:
  args = _common.parse_args(__doc__.splitlines()[0])
  from slim_jax.data import prepare, sequences  # pylint: disable=import-outside-toplevel
  from slim_jax.recommenders import registry  # pylint: disable=import-outside-toplevel
  from slim_jax.train import loop, seed_stack  # pylint: disable=import-outside-toplevel

  backbones = BACKBONES[:1] if args.quick else BACKBONES
  seeds = (0, 1, 2) if args.quick else (0, 1, 2, 3, 4)
  epochs = 2 if args.quick else 3
  max_users = 120 if args.quick else 0
  rows, details = [], {"seeds": len(seeds), "epochs": epochs, "batch_size": 256,
                       "users": max_users or "all", "cases": {}}
  with tempfile.TemporaryDirectory() as tmp:
    data = prepare.prepare_or_load("ml-100k", None, tmp, max_users=max_users)
    negatives = sequences.load_negatives(prepare.prepared_dir(tmp))
    config = loop.TrainConfig(loss="bce", epochs=epochs, batch_size=256, patience=epochs,
                              eval_batch_size=256, max_len=50, learning_rate=1e-3,
                              progress=False)
    for name in backbones:
      model = registry.make_recommender(name, num_items=data.num_items, max_len=50,
                                        hidden_size=64)

      def stacked(name=name, model=model):
        dirs = [os.path.join(tmp, "stack", name, str(s)) for s in seeds]
        return seed_stack.train_and_evaluate_seeds(model, data, negatives, config, seeds, dirs,
                                                   log=lambda _: None)

      def separate(name=name, model=model):
        return [loop.train_and_evaluate(
            model, data, negatives, dataclasses.replace(config, seed=s),
            os.path.join(tmp, "alone", name, str(s)), log=lambda _: None) for s in seeds]

      ours_s = _common.timed(stacked)
      peer_s = _common.timed(separate)
      rows.append(_common.Row.cost(f"{name}: {len(seeds)} seeds x {epochs} epochs", "s",
                                   ours_s, peer_s))
      details["cases"][name] = {"stacked_s": ours_s, "separate_s": peer_s}
  _common.report("seed_stack", rows, args.out, details=details)


if __name__ == "__main__":
  main()
