"""The budget presets of experiments/run_slim.py: smoke (synthetic data, minutes on 2
cores), default (MovieLens-100k sampled to 120 users, sized for a 2-core CPU), full-cpu
(every ml-100k user and the whole grid, with the default preset's LLM settings: the full
MovieLens-100k report on a CPU, in resumable pieces), full (the paper-style grid, GPU for
the LLM stages). Explicit flags override a preset's fields."""

from __future__ import annotations

import dataclasses

from slim_jax.recommenders import slim
from slim_jax.teacher import prompts


@dataclasses.dataclass(frozen=True)
class Preset:
  dataset: str
  synthetic: dict | None
  max_users: int  # 0 = every user; else a seeded uniform sample of users (prepare.py)
  teacher_users: int  # 0 = every user
  max_history: int  # most recent training items in a teacher or student prompt
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
  learning_rate: float = 1e-3
  holdout: int = prompts.DEFAULT_RATIONALE_HOLDOUT  # training items after a training
  # rationale's cutoff (docs/causal_rationales.md)
  reading: tuple[str, ...] = ()  # what the preset's report can and cannot show
  # Distill on rationales the teacher's token limit cut (finish_reason 'length'). The
  # small presets' 24-64-token rationales are all cut; dropping them leaves nothing.
  keep_cut_rationales: bool = False
  # Most student prompts per generation batch. On 2 CPU cores a bf16 decode step's products
  # reach about 200 GFLOP/s from 128 rows, 80 at 64; 943 ml-100k evaluation rationales of
  # 96 tokens (compiling included) took 360 s at 128 rows a batch, 337 s at 256
  # (2026-12-04, docs/results/llama.md). The KV cache grows with rows x (prompt + answer).
  student_batch: int = 256


ALL_VARIANTS = tuple(slim.VARIANTS)  # report order: backbone, backbone+, slim-, slim, ...
PRESETS = {
    "smoke": Preset(
        dataset="synthetic", synthetic={"num_users": 32, "num_items": 40, "num_clusters": 4,
                                        "min_length": 6, "max_length": 10}, max_users=0,
        teacher_users=16, max_history=10, teacher_tokens=24, distill_steps=2,
        distill_max_length=448, student_tokens=24, backbones=("sasrec",),
        variants=("backbone", "backbone+", "slim-", "slim", "slim-shuffled", "agnostic",
                  "agnostic-history"), seeds=(0,), epochs=2, patience=2, hidden_size=16,
        batch_size=16, max_len=10, keep_cut_rationales=True,
        expected={"prepare": 5, "teacher": 90, "distill": 60, "generate": 90, "encode": 40,
                  "recommend": 120, "report": 5}),
    "default": Preset(
        dataset="ml-100k", synthetic=None, max_users=120, teacher_users=48, max_history=5,
        teacher_tokens=64, distill_steps=6, distill_max_length=512, student_tokens=48,
        backbones=("gru4rec", "sasrec"),
        variants=("backbone", "backbone+", "slim-", "slim", "slim-shuffled", "agnostic",
                  "agnostic-history"),
        seeds=(0, 1, 2), epochs=30, patience=8, hidden_size=64, batch_size=32,
        max_len=50, learning_rate=3e-3, keep_cut_rationales=True,
        # Chosen by measurement on the 120 users (3 seeds, the rationale-free rows): at
        # batch 128 an epoch is 3 Adam steps, and with lr 1e-3 and patience 3-5 most seeds
        # stopped on the popularity plateau (GRU4Rec and SR-GNN NDCG@10 0.14-0.17 against
        # most-popular's 0.153); batch 32, lr 3e-3, patience 10 gave GRU4Rec 0.30-0.35,
        # SASRec 0.36-0.40, SR-GNN 0.25-0.32. SR-GNN (about 75 s per training on 2 cores)
        # and the Step ablations do not fit the 30-minute budget: --backbones and
        # --variants add them. Two rationales per user (docs/causal_rationales.md) doubled
        # the LLM stages: with 128 teacher and 96 student tokens and 12 LoRA steps they took
        # teacher 372 s, distill 400 s, generate 670 s on a fresh clone (2026-12-03), so the
        # rationales are shorter and the distillation shorter here. With 64 teacher users a
        # fresh clone took 30.6 min (teacher 275 s, distill 271 s, generate 282 s, encode
        # 28 s, recommend 860 s), so 48 teacher users: 28.3 min on a fresh clone of
        # 711006d (teacher 160 s, distill 227 s, generate 317 s, encode 34 s, recommend
        # 841 s). With the student in bf16 (--dtype=auto on this CPU), 19.7 min on an idle
        # fresh clone of de8a23b: teacher 106 s, distill 148 s, generate 165 s, encode
        # 22 s, recommend 645 s. With the shared prompt prefix held once and prompts
        # batched by length, 13.0 min on an idle fresh clone of bb95365 (2026-12-04):
        # teacher 68 s, distill 122 s, generate 100 s, encode 13 s, recommend 417 s. With
        # dropout masks from packed random bits, 11.7 min on an idle fresh clone of bea018b
        # (2026-12-05): teacher 63 s, distill 116 s, generate 97 s, encode 13 s, recommend
        # 367 s (docs/results/slim_ml100k_default/).
        expected={"prepare": 5, "teacher": 80, "distill": 130, "generate": 110,
                  "encode": 20, "recommend": 500, "report": 5},
        reading=(
            "The default preset is a smoke test of the method on real data, not a test of "
            "the paper's claims: 120 sampled MovieLens-100k users, SmolLM2-135M as both "
            "teacher and student (5-item prompts, 48-64-token rationales, 6 LoRA steps), "
            "3 seeds, GRU4Rec and SASRec only. With 120 test users one user is 0.8 points "
            "of HR@10; read the intervals, not the means.",
            "What it can show: that each trained row learns more than popularity (the "
            "most-popular control claims), that the pipeline and the causal rationale "
            "rule run end to end, and how often the small models' rationales parse into "
            "steps or merely restate the history (the rationale table). What it cannot "
            "show: whether reasoning from a capable teacher helps; SLIM vs backbone+ and "
            "SLIM vs SLIM-shuffled are expected to be inconclusive here. The full "
            "MovieLens-100k report (every user, every variant, 5 seeds) is the test.",
        )),
    # The full MovieLens-100k report (docs/results/slim_ml100k_full/): every user and the
    # whole grid at the paper's budget (5 seeds, up to 200 epochs, patience 10), with the
    # default preset's teacher and student settings so the LLM stages fit a 2-core CPU;
    # the teacher writes every user's rationales, so SLIM- and SLIM are scored on the same
    # users. The grid runs in pieces on one workdir (--backbones, --variants, --seeds).
    "full-cpu": Preset(
        dataset="ml-100k", synthetic=None, max_users=0, teacher_users=0, max_history=5,
        teacher_tokens=64, distill_steps=6, distill_max_length=512, student_tokens=48,
        backbones=("gru4rec", "sasrec", "srgnn"), variants=ALL_VARIANTS, seeds=(0, 1, 2, 3, 4),
        epochs=200, patience=10, hidden_size=64, batch_size=256, max_len=50,
        keep_cut_rationales=True,
        # lr 3e-3, measured on every user, 5 seeds, the backbone rows (2026-12-05): SASRec
        # test NDCG@10 0.450 +- 0.013 (sample std) with 41-74 epochs run, against 0.457 +-
        # 0.007 and 93-133 at 1e-3 (docs/results/backbones_ml100k.md); GRU4Rec 0.437 +-
        # 0.008 with 57-99 epochs, against 0.396 +- 0.046 and 26-126.
        learning_rate=3e-3,
        expected={"prepare": 10, "teacher": 1200, "distill": 130, "generate": 800,
                  "encode": 120, "recommend": 30000, "report": 30},
        reading=(
            "The full MovieLens-100k grid tests the paper's claims on every user (943) "
            "with 5 seeds a row, but with SmolLM2-135M as both teacher and student: "
            "5-item prompts, 48-64-token rationales (cut by the token limit), 6 LoRA "
            "steps. Such rationales mostly restate the prompt's items and rarely parse "
            "into steps (the rationale table), so the grid tests what rationales of this "
            "kind add, not what a capable teacher's reasoning would.",
            "Two intervals per claim: the users-only one decides the verdict (issue 18's "
            "protocol); the one that resamples each row's seeds too says whether another "
            "5 trainings would likely agree. SLIM-shuffled (another user's rationale) and "
            "agnostic-history (no rationale) separate a rationale's content from the "
            "presence of a text vector; a Step ablation under an 80% step parse rate is "
            "marked not meaningful.",
        )),
    "full": Preset(
        dataset="ml-100k", synthetic=None, max_users=0, teacher_users=0, max_history=50,
        teacher_tokens=512,
        distill_steps=0, distill_max_length=1024, student_tokens=512,
        backbones=("gru4rec", "sasrec", "srgnn"), variants=ALL_VARIANTS, seeds=(0, 1, 2, 3, 4),
        epochs=200, patience=10, hidden_size=64, batch_size=256, max_len=50,
        student_batch=32,  # 50-item prompts and 512-token answers: a larger KV cache a row
        expected={"prepare": 10, "teacher": 20000, "distill": 5000, "generate": 20000,
                  "encode": 300, "recommend": 20000, "report": 10}),
}


# Rows per teacher batch: the teacher server batches the client's concurrent requests; 16
# keeps 64 teacher users at 4 full batches.
TEACHER_BATCH = 16
