"""benchmarks/_common.py: rows, ratios and the JSON report."""

import json
import os
import sys

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(_BENCH))

import _common  # noqa: E402


def test_ratios_say_how_much_better_ours_is():
  assert _common.Row.cost("t", "s", 2.0, 10.0).ratio == 5.0  # 5x faster
  assert _common.Row.rate("q", "ndcg", 0.45, 0.40).ratio == 0.45 / 0.40


def test_report_writes_rows_and_details(tmp_path, capsys):
  out = tmp_path / "sub" / "r.json"
  rows = [_common.Row.cost("x: pass", "s", 1.0, 4.0)]
  _common.report("bench", rows, str(out), details={"cpus": 1, "x": {"best_epoch": 7}})
  written = json.loads(out.read_text())
  assert written["rows"][0] == {"case": "x: pass", "unit": "s", "ours": 1.0, "peer": 4.0,
                                "ratio": 4.0}
  assert written["details"] == {"cpus": 1, "x": {"best_epoch": 7}}
  assert "| x: pass | s | 1 | 4 | 4.00 |" in capsys.readouterr().out
  _common.report("bench", rows, str(out))  # no details: no key
  assert "details" not in json.loads(out.read_text())
