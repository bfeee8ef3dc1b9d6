"""The benchmark contract of DESIGN.md, shared by every script in benchmarks/.

Each benchmark measures its cases for the project ("ours") and for a PyTorch peer in the
same run: alternating, after warm-up, the median of several repeats. It prints a table
and, with `--out FILE`, writes the same rows as JSON:

  {"benchmark": name, "rows": [{"case", "unit", "ours", "peer", "ratio"}, ...],
   "details": {...}}   (optional: what a row alone cannot say, e.g. epochs of a fit)

`ratio > 1` means the project is better: peer / ours for costs (seconds, bytes), ours /
peer for rates (items per second). `--quick` selects a reduced size that runs in under
three minutes on the 2-core machine.

  args = parse_args("What this benchmark measures.")
  ours, peer = alternate(run_ours, run_peer, repeats=5, warmup=1)
  rows = [Row.cost("sasrec: train epoch", "s", ours, peer)]
  report("recommenders", rows, args.out)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

from slim_jax import io


@dataclasses.dataclass(frozen=True)
class Row:
  case: str
  unit: str
  ours: float
  peer: float
  ratio: float  # > 1: the project is better

  @classmethod
  def cost(cls, case: str, unit: str, ours: float, peer: float) -> "Row":
    """Lower is better (time, memory): ratio = peer / ours."""
    return cls(case, unit, float(ours), float(peer), float(peer) / max(float(ours), 1e-12))

  @classmethod
  def rate(cls, case: str, unit: str, ours: float, peer: float) -> "Row":
    """Higher is better (throughput, accuracy): ratio = ours / peer."""
    return cls(case, unit, float(ours), float(peer), float(ours) / max(float(peer), 1e-12))


def parse_args(description: str, argv: Sequence[str] | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
  """The shared flags, plus whatever `add_arguments(parser)` adds for one benchmark."""
  parser = argparse.ArgumentParser(description=description)
  if add_arguments is not None:
    add_arguments(parser)
  parser.add_argument("--quick", action="store_true",
                      help="reduced size: under three minutes on the 2-core machine")
  parser.add_argument("--out", default=None, help="also write the rows as JSON to this file")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed repeats per side (default: 3 with --quick, else 5)")
  args = parser.parse_args(argv)
  if args.repeats is None:
    args.repeats = 3 if args.quick else 5
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  return args


def timed(fn: Callable[[], object]) -> float:
  """Seconds one call of `fn` takes (it must block until its work is done)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def alternate(ours: Callable[[], object], peer: Callable[[], object], *, repeats: int,
              warmup: int = 1) -> tuple[float, float]:
  """Median seconds of `ours` and `peer`, called in turn so drift hits both alike."""
  for _ in range(warmup):
    ours()
    peer()
  ours_times, peer_times = [], []
  for _ in range(repeats):
    ours_times.append(timed(ours))
    peer_times.append(timed(peer))
  return statistics.median(ours_times), statistics.median(peer_times)


def format_table(name: str, rows: Sequence[Row]) -> str:
  lines = [f"## {name}", "",
           "| case | unit | ours | peer | ratio (>1: ours better) |",
           "| --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r.case} | {r.unit} | {r.ours:.4g} | {r.peer:.4g} | {r.ratio:.2f} |")
  return "\n".join(lines)


def report(name: str, rows: Sequence[Row], out: str | None = None,
           details: dict | None = None) -> dict:
  """Prints the table; writes the JSON (atomically) when `out` is given; returns it."""
  result = {"benchmark": name, "rows": [dataclasses.asdict(r) for r in rows]}
  if details:
    result["details"] = details
  print(format_table(name, rows))
  if out:
    io.write_json(out, result)
  return result
