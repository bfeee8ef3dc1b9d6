"""slim_jax/claims.py: paired bootstrap, verdicts, the claims on planted effects, the gate."""

import csv

import numpy as np
import pytest

from slim_jax import claims

USERS = 200
TEACHER = 100  # users 0, 2, 4, ... have a teacher rationale
COLD = 40  # users 0..39 are cold-start users
TEACHER_EDGE = 0.02  # SLIM - SLIM- on teacher users; on the others SLIM- is far ahead
OFFSETS = {  # planted NDCG@10 offset of each row from a per-user base, mean over seeds
    ("sasrec", "backbone"): 0.0, ("sasrec", "backbone+"): 0.0, ("sasrec", "slim"): 0.05,
    ("sasrec", "slim-"): 0.05 - TEACHER_EDGE, ("sasrec", "slim-shuffled"): 0.01,
    ("none", "agnostic"): 0.02, ("none", "agnostic-history"): 0.08,
    ("none", "agnostic-step1"): -0.03, ("none", "agnostic-step2"): -0.03,
    ("none", "agnostic-step3"): 0.02, ("none", "most-popular"): -0.02}
HEAD_SHARE = {"backbone": 0.6, "slim": 0.4}  # head@10 per user; every other row 0.5


def grid_results(offsets=None, *, users=USERS, seeds=3, rng_seed=0) -> dict:
  """A format-2 results dict with the planted OFFSETS (or `offsets`) per row.

  Each user's NDCG@10, averaged over seeds, is exactly base_u + offset (+ per-user noise
  with a zero mean over users), so the true mean difference of two rows is their offset
  difference. backbone+ is backbone plus such noise; agnostic-step3 is agnostic plus it.
  """
  offsets = dict(OFFSETS if offsets is None else offsets)
  rng = np.random.default_rng(rng_seed)
  base = rng.uniform(0.15, 0.45, users)  # [U]

  def centred(scale, shape=(users,)):
    x = rng.normal(0, scale, shape)
    return x - x.mean(0)

  value = {k: base + v + centred(0.03) for k, v in offsets.items()}  # [U] per row
  for near, ref in ((("sasrec", "backbone+"), ("sasrec", "backbone")),
                    (("none", "agnostic-step3"), ("none", "agnostic"))):
    if near in value and ref in value:
      value[near] = value[ref] + offsets[near] - offsets[ref] + centred(0.01)
  slim, minus = ("sasrec", "slim"), ("sasrec", "slim-")
  if slim in value and minus in value:
    no_teacher = np.arange(users) % 2 == 1
    value[minus] = value[slim] - TEACHER_EDGE
    value[minus][no_teacher] += 0.15  # SLIM- wins on users it never read a rationale for
  rows = []
  for (backbone, variant), v in value.items():
    ndcg = v + centred(0.02, (seeds, users))  # [S, U], seed mean exactly v
    head = HEAD_SHARE.get(variant, 0.5) + centred(0.05, (seeds, users))
    per_user = [{"ndcg@10": list(n), "hr@10": list(n + 0.1), "hr@20": list(n + 0.2),
                 "head@10": list(h)} for n, h in zip(ndcg, head)]
    trained = variant != "most-popular"
    rows.append({
        "backbone": backbone, "variant": variant, "seeds": list(range(seeds)),
        "test": [{m: float(np.mean(p[m])) for m in claims.METRICS} for p in per_user],
        "per_user": per_user,
        "best_epoch": [2 + s for s in range(seeds)] if trained else [],
        "epochs_run": [5 + s for s in range(seeds)] if trained else [],
        "train_seconds": [10.0 * (s + 1) for s in range(seeds)] if trained else [],
        "history": [[{"epoch": e, "train_loss": 1.0 / e, "valid/ndcg@10": 0.1 * e}
                     for e in range(1, 6)] for _ in range(seeds)] if trained else []})
  return {"format": 2, "test_users": list(range(users)), "cold_users": list(range(COLD)),
          "teacher_users": list(range(0, 2 * TEACHER, 2)), "head_share": 0.2,
          "train_fraction": 1.0, "rows": rows}


@pytest.fixture(scope="module")
def results():
  return grid_results()


@pytest.fixture(scope="module")
def found(results):
  """{(claim, backbone): Claim} with the student's steps parsing well."""
  out = claims.compute(results, {"student": {"parse_rate": 0.9}})
  return {(c.claim, c.backbone): c for c in out}


def seed_mean(results, key, metric="ndcg@10"):
  row = claims.rows_by_key(results)[key]
  return np.mean([s[metric] for s in row["per_user"]], 0)  # [U]


# ----------------------------------------------------------------------------- bootstrap


def test_pairing_removes_between_user_variance():
  rng = np.random.default_rng(1)
  b = rng.normal(0, 100, (3, 500))  # huge between-user spread
  diff, low, high = claims.paired_bootstrap(b + 0.25, b)
  assert diff == pytest.approx(0.25) and low == pytest.approx(0.25) == high
  diff, low, high = claims.paired_bootstrap(b[:2] + 0.25, b)  # seed counts may differ
  assert low < 0.25 - 1 and high > 0.25 + 1  # other seeds of b: no longer a constant


def test_bootstrap_deterministic_and_subset():
  rng = np.random.default_rng(2)
  a, b = rng.normal(0.1, 1, (3, 300)), rng.normal(0, 1, (2, 300))
  assert claims.paired_bootstrap(a, b, seed=7) == claims.paired_bootstrap(a, b, seed=7)
  assert claims.paired_bootstrap(a, b, seed=7) != claims.paired_bootstrap(a, b, seed=8)
  users = np.arange(0, 300, 3)
  diff, _, _ = claims.paired_bootstrap(a, b, users=users)
  assert diff == pytest.approx((a.mean(0) - b.mean(0))[users].mean())
  assert all(np.isnan(claims.paired_bootstrap(a, b, users=np.arange(0))))
  with pytest.raises(ValueError, match="300 users, b has 299"):
    claims.paired_bootstrap(a, b[:, 1:])


def test_two_level_bootstrap_counts_the_spread_between_seeds():
  rng = np.random.default_rng(3)
  users = rng.normal(0, 0.2, 400)  # [U]
  seed_shift = np.array([[-0.06], [0.06], [-0.03], [0.03], [0.0]])  # [S, 1] one per training
  b = users + 0.01 * rng.normal(size=(5, 400))
  a = users + 0.01 + seed_shift + 0.01 * rng.normal(size=(5, 400))
  diff, low, high = claims.paired_bootstrap(a, b)
  assert diff == pytest.approx(0.01, abs=0.002) and low > 0  # over users: holds
  seeds_low, seeds_high = claims.two_level_bootstrap(a, b)
  assert seeds_low < 0 < seeds_high  # another 5 trainings could land either side
  assert seeds_high - seeds_low > 5 * (high - low)


def test_two_level_bootstrap_equals_users_only_when_seeds_agree():
  rng = np.random.default_rng(4)
  b = np.repeat(rng.normal(0, 1, (1, 300)), 3, axis=0)  # [3, U], identical seeds
  a = b + 0.1 + rng.normal(0, 0.5, (1, 300))
  _, low, high = claims.paired_bootstrap(a, b, samples=4000)
  seeds_low, seeds_high = claims.two_level_bootstrap(a, b, samples=4000)
  assert seeds_low == pytest.approx(low, abs=0.01) and seeds_high == pytest.approx(high, abs=0.01)
  users = np.arange(0, 300, 2)
  assert claims.two_level_bootstrap(a, b, seed=5, users=users) == \
      claims.two_level_bootstrap(a, b, seed=5, users=users)
  assert all(np.isnan(claims.two_level_bootstrap(a, b, users=np.arange(0))))
  with pytest.raises(ValueError, match="300 users, b has 299"):
    claims.two_level_bootstrap(a, b[:, 1:])


@pytest.mark.parametrize("low, high, margin, expected", [
    (0.01, 0.02, None, "holds"), (-0.02, -0.01, None, "does not hold"),
    (-0.01, 0.02, None, "inconclusive"), (float("nan"), 0.1, None, "inconclusive"),
    (-0.01, 0.01, 0.02, "holds"), (0.03, 0.05, 0.02, "does not hold"),
    (-0.05, -0.03, 0.02, "does not hold"), (0.01, 0.03, 0.02, "inconclusive")])
def test_verdict(low, high, margin, expected):
  assert claims.verdict(low, high, margin) == expected


# ----------------------------------------------------------------------------- claims


@pytest.mark.parametrize("claim, backbone, verdict, true_difference", [
    ("SLIM > backbone+", "sasrec", "holds", 0.05),
    ("backbone+ > backbone", "sasrec", "inconclusive", 0.0),
    ("SLIM > SLIM-shuffled (control)", "sasrec", "holds", 0.04),
    ("ID-agnostic > agnostic-history (control)", "none", "does not hold", -0.06),
    ("ID-agnostic > Step1", "none", "holds", 0.05),
    ("slim > most-popular (control)", "sasrec", "holds", 0.07),
    ("agnostic-step1 > most-popular (control)", "none", "does not hold", -0.01)])
def test_planted_effects(found, claim, backbone, verdict, true_difference):
  c = found[(claim, backbone)]
  assert c.verdict == verdict
  assert c.difference == pytest.approx(true_difference, abs=1e-9)
  assert c.low < true_difference < c.high


def test_difference_is_the_paired_mean(results, found):
  c = found[("SLIM > backbone+", "sasrec")]
  d = seed_mean(results, ("sasrec", "slim")) - seed_mean(results, ("sasrec", "backbone+"))
  assert c.difference == pytest.approx(d.mean())
  assert (c.a, c.b, c.users, c.metric) == ("sasrec/slim", "sasrec/backbone+", "all", "ndcg@10")
  width = 2 * 1.96 * d.std() / np.sqrt(USERS)  # normal 95% interval over users
  assert c.high - c.low == pytest.approx(width, rel=0.2)


def test_slim_minus_uses_teacher_users_only(results, found):
  c = found[("SLIM > SLIM-", "sasrec")]
  assert c.users == "teacher" and c.verdict == "holds"
  assert c.difference == pytest.approx(TEACHER_EDGE)  # over all users SLIM- is ahead
  d = seed_mean(results, ("sasrec", "slim")) - seed_mean(results, ("sasrec", "slim-"))
  assert d.mean() < 0


def test_popularity_bias_claim(found):
  c = found[("SLIM less popularity-biased than backbone", "sasrec")]
  assert c.metric == "head@10" and c.verdict == "holds"
  assert c.difference == pytest.approx(HEAD_SHARE["backbone"] - HEAD_SHARE["slim"])


@pytest.mark.parametrize("margins, verdict", [
    (0, "holds"), (1, "inconclusive"), (-1, "inconclusive"), (3, "does not hold"),
    (-3, "does not hold")])
def test_step3_close_to_agnostic(results, margins, verdict):
  """Step3 - ID-agnostic is planted at `margins` times the 5% margin."""
  margin = claims.EQUIVALENCE_MARGIN * seed_mean(results, ("none", "agnostic")).mean()
  step3 = OFFSETS[("none", "agnostic")] + margins * margin
  shifted = grid_results({**OFFSETS, ("none", "agnostic-step3"): step3})
  [c] = [c for c in claims.compute(shifted, {"student": {"parse_rate": 1.0}})
         if c.claim == "Step3 close to ID-agnostic"]
  assert (c.a, c.b, c.backbone) == ("agnostic-step3", "agnostic", "none")
  assert c.difference == pytest.approx(margins * margin)
  assert c.verdict == verdict, (c.low, c.high, margin)
  assert f"margin ±{margin:.4f}" in c.note


def test_cold_start_claim_picks_the_best_id_based_cold_rival(results, found):
  c = found[("ID-agnostic best on cold-start users", "none")]
  rivals = [("sasrec", v) for v in ("backbone", "backbone+", "slim-", "slim")]
  best = max(rivals, key=lambda k: seed_mean(results, k)[:COLD].mean())
  assert c.users == "cold" and c.b == claims.label(best) and claims.label(best) in c.note
  d = seed_mean(results, ("none", "agnostic")) - seed_mean(results, best)
  assert c.difference == pytest.approx(d[:COLD].mean())


def test_cold_start_rival_is_never_a_step_ablation():
  # agnostic-step1 far ahead on cold users: still not the rival, and a low step parse rate
  # (which gates Step claims) leaves this claim's verdict alone.
  results = grid_results({**OFFSETS, ("none", "agnostic-step1"): 0.3})
  [c] = [c for c in claims.compute(results, {"student": {"parse_rate": 0.1}})
         if c.claim == "ID-agnostic best on cold-start users"]
  assert c.b.startswith("sasrec/") and c.verdict != "not meaningful"


def test_most_popular_control_for_every_other_row(results, found):
  controls = {(c.a, c.b) for c in found.values() if c.claim.endswith("> most-popular (control)")}
  others = {claims.label(k) for k in claims.order(results)} - {"most-popular"}
  assert controls == {(a, "most-popular") for a in others}
  assert len(others) == len(OFFSETS) - 1


STEP_CLAIMS = {"ID-agnostic > Step1", "ID-agnostic > Step2", "Step3 close to ID-agnostic",
               "agnostic-step1 > most-popular (control)",
               "agnostic-step2 > most-popular (control)",
               "agnostic-step3 > most-popular (control)"}


@pytest.mark.parametrize("rate, gated", [(0.5, True), (0.79, True), (0.8, False), (0.95, False)])
def test_step_gate(results, rate, gated):
  free = {c.claim: c for c in claims.compute(results, {"student": {"parse_rate": 1.0}})}
  out = {c.claim: c for c in claims.compute(results, {"student": {"parse_rate": rate}})}
  assert STEP_CLAIMS <= set(out)
  for name, c in out.items():
    if name in STEP_CLAIMS and gated:
      assert c.verdict == c.seeds_verdict == "not meaningful"
      assert f"{100 * rate:.0f}% < 80%" in c.note
    else:
      assert (c.verdict, c.seeds_verdict) == (free[name].verdict, free[name].seeds_verdict)
  assert free["ID-agnostic > Step1"].verdict == "holds"


def test_no_student_stats_leaves_steps_ungated(results):
  out = {c.claim: c for c in claims.compute(results, None)}
  assert out["ID-agnostic > Step1"].verdict == "holds"
  assert "student step parse rate not given" in out["ID-agnostic > Step1"].note


def test_compute_is_deterministic(results):
  first = claims.compute(results, samples=500, seed=3)
  assert first == claims.compute(results, samples=500, seed=3)
  assert [c.low for c in first] != [c.low for c in claims.compute(results, samples=500, seed=4)]


def test_missing_rows_give_no_claim():
  results = grid_results({k: v for k, v in OFFSETS.items() if k[1] in ("slim", "backbone+")})
  assert [c.claim for c in claims.compute(results)] == ["SLIM > backbone+"]


# ----------------------------------------------------------------------------- errors


def test_rows_by_key_errors(results):
  with pytest.raises(ValueError, match="format 1, expected 2"):
    claims.rows_by_key({**results, "format": 1})
  with pytest.raises(ValueError, match="format None"):
    claims.rows_by_key({k: v for k, v in results.items() if k != "format"})
  twice = {**results, "rows": results["rows"] + results["rows"][:1]}
  with pytest.raises(ValueError, match=r"\('sasrec', 'backbone'\) twice"):
    claims.rows_by_key(twice)


def _broken(results, per_user):
  rows = [dict(r) for r in results["rows"]]
  slim = next(r for r in rows if r["variant"] == "slim")
  slim["per_user"] = per_user(slim["per_user"])
  return {**results, "rows": rows}


@pytest.mark.parametrize("per_user, message", [
    (lambda p: [{**s, "ndcg@10": s["ndcg@10"][:-1]} for s in p],
     r"seed 0 has per-user ndcg@10 for 199 users"),
    (lambda p: [], r"shape \(0,\)"),
    (lambda p: [{k: v for k, v in s.items() if k != "ndcg@10"} for s in p], "no per-user")])
def test_per_user_errors_name_the_row(results, per_user, message):
  with pytest.raises(ValueError, match="sasrec/slim") as e:
    claims.compute(_broken(results, per_user))
  assert e.match(message)


def test_ragged_per_user_error_names_the_row(results):
  ragged = _broken(results, lambda p: [p[0], {**p[1], "ndcg@10": p[1]["ndcg@10"][:-1]}, p[2]])
  with pytest.raises(ValueError, match="sasrec/slim: seed 1 has per-user ndcg@10 for"):
    claims.compute(ragged)


def test_teacher_users_outside_test_users(results):
  with pytest.raises(ValueError, match="1 teacher_users are not test_users"):
    claims.compute({**results, "teacher_users": [0, 2, USERS + 5]})


# ----------------------------------------------------------------------------- claims.csv


def test_write_csv(tmp_path, results):
  out = claims.compute(results, {"student": {"parse_rate": 0.5}}, samples=300)
  path = tmp_path / "claims.csv"
  claims.write_csv(str(path), out)
  with open(path, newline="", encoding="utf-8") as f:
    lines = list(csv.reader(f))
  assert lines[0] == ["claim", "backbone", "users", "metric", "difference", "low", "high",
                      "verdict", "seeds_low", "seeds_high", "seeds_verdict", "note"]
  assert len(lines) == len(out) + 1
  for line, c in zip(lines[1:], out):
    assert line[:4] == [c.claim, c.backbone, c.users, c.metric]
    assert [float(x) for x in line[4:7]] == pytest.approx([c.difference, c.low, c.high],
                                                          abs=1e-6)
    assert [float(x) for x in line[8:10]] == pytest.approx([c.seeds_low, c.seeds_high],
                                                           abs=1e-6)
    assert [line[7], line[10], line[11]] == [c.verdict, c.seeds_verdict, c.note]
