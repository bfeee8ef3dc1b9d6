"""The three-step chain-of-thought prompt p'_u and the parser that splits a rationale r'_u.

SLIM asks the teacher (and later the student) for a rationale in three steps: (1) the
user's preferences, (2) brands and categories that fit them, (3) items that fit those. The
prompt lists the user's history from the item table, oldest first, taken from the TRAINING
PREFIX ONLY (`SequenceDataset.train_prefix`): the validation and test items never reach a
prompt. Long histories keep the most recent `max_history` items.

Every user gets two rationales (docs/causal_rationales.md), each written from the first
`cutoff` items of the training prefix and visible only at positions whose history holds
them all:
  'eval'   cutoff = the whole prefix; read when scoring the validation and test targets;
  'train'  cutoff = the prefix less its last `holdout` items (at most half of it); read at
           the training positions at or after the cutoff, so no training target a
           position predicts is in the text it reads.
Their files are rationales/<source>.jsonl and rationales/<source>_train.jsonl.

The user message comes from a template with a `{history}` placeholder (and optionally
`{num_items}`). A replacement template is a UTF-8 text file in the same form; a line holding
only `---` splits it into a system message (above) and the user message (below). Literal
braces are written `{{` and `}}`, as in `str.format`.

`parse_steps` splits an answer into its steps at explicit "Step 1", "Step 2", "Step 3"
markers (the prompt asks for them; decoration such as "**Step 1:**", "### Step 2" or
"STEP THREE" is accepted). Bare numbering ("1.", "2)") and headings are NOT steps: with a
rationale that lists items they would make Step 1/2/3 the first item, the second and the
rest. A missing step is None; an answer with fewer than two markers is None, and the caller
keeps the raw text and records the failure (the report shows the parse rate per source).
"""

from __future__ import annotations

import dataclasses
import re
import string

from slim_jax.data import raw
from slim_jax.data.dataset import Item, SequenceDataset

DEFAULT_MAX_HISTORY = 50
DEFAULT_RATIONALE_HOLDOUT = 10  # training items after a training rationale's cutoff
KINDS = ("eval", "train")

DEFAULT_SYSTEM = ("You are an expert recommender system. You reason step by step about a "
                  "user's history and answer concisely.")

# The history comes before the instructions. Instructions first would let the generator
# share 160 of about 295 tokens of every prompt instead of 64 (slim_jax/generate.py), but
# SmolLM2-135M then echoes the instructions: on 32 ml-100k users, 8 of its 64-token answers
# named a history title against 24 with this order, and the distilled student's answers
# became nearly the same for every user (docs/results/llama.md).
DEFAULT_USER_TEMPLATE = """\
Here are the {num_items} items a user interacted with (bought, rated or watched), in time \
order, oldest first, one item per line.

{history}

Think step by step and answer in three steps:
Step 1: Summarize the user's preferences from this history.
Step 2: Based on these preferences, recommend brands and categories the user may like.
Step 3: Based on the recommended brands and categories, recommend items the user may \
interact with next.
Start each step on a new line with "Step 1:", "Step 2:" and "Step 3:"."""

ALLOWED_FIELDS = ("history", "num_items")
SYSTEM_SEPARATOR = "---"
STEP_KEYS = ("step1", "step2", "step3")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A chat prompt: an optional system message and a user message with `{history}`."""
  user: str = DEFAULT_USER_TEMPLATE
  system: str = DEFAULT_SYSTEM
  source: str = "<default>"  # where it came from, for error messages and manifests

  def __post_init__(self):
    _validate_fields(self.user, self.source, required=("history",))
    _validate_fields(self.system, self.source + " (system part)", required=())

  def render(self, history: str, num_items: int) -> list[dict]:
    messages = []
    if self.system.strip():
      messages.append({"role": "system", "content": self.system.format(num_items=num_items)})
    messages.append({"role": "user",
                     "content": self.user.format(history=history, num_items=num_items)})
    return messages


def _validate_fields(text: str, source: str, required: tuple[str, ...]) -> None:
  try:
    fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
  except ValueError as e:
    raise ValueError(f"prompt template {source}: {e}; write literal braces as '{{{{' and "
                     "'}}}}'") from e
  for name in fields:
    if name not in ALLOWED_FIELDS:
      raise ValueError(f"prompt template {source} uses the placeholder {{{name}}}; the "
                       f"allowed placeholders are {', '.join('{%s}' % f for f in ALLOWED_FIELDS)}"
                       "; write literal braces as '{{' and '}}'")
  for name in required:
    if name not in fields:
      raise ValueError(f"prompt template {source} has no {{{name}}} placeholder; add one "
                       "where the user's history should go")


def load_template(path: str) -> PromptTemplate:
  """Reads a template file: user message with {history}; optional system part above '---'."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise FileNotFoundError(f"cannot read the prompt template {path}: {e.strerror}") from e
  lines = text.splitlines()
  separators = [i for i, line in enumerate(lines) if line.strip() == SYSTEM_SEPARATOR]
  if len(separators) > 1:
    raise ValueError(f"prompt template {path}: lines {[i + 1 for i in separators]} are all "
                     f"'{SYSTEM_SEPARATOR}'; use one to split the system message (above) "
                     "from the user message (below)")
  if separators:
    system = "\n".join(lines[:separators[0]]).strip()
    user = "\n".join(lines[separators[0] + 1:]).strip()
  else:
    system, user = "", text.strip()
  return PromptTemplate(user=user, system=system, source=path)


def describe_item(item: Item) -> str:
  """One history line: the item's description f_i from the item table.

  The loaders write `text` as labelled fields ('Title: X; Brand: Y; Categories: a, b' for
  Amazon, 'Title: X; Year: Y; Genres: a, b' for MovieLens); an item without one is described
  from its title, brand and categories the same way.
  """
  if item.text.strip():
    return " ".join(item.text.split())
  return raw.describe((("Title", item.title.strip() or f"item {item.raw_id}"),
                       ("Brand", item.brand.strip()),
                       ("Categories", [c.strip() for c in item.categories if c.strip()])))


def source_name(base: str, kind: str) -> str:
  """'student', 'train' -> 'student_train' (the rationale file's and vectors' name)."""
  if kind not in KINDS:
    raise ValueError(f"unknown rationale kind {kind!r}; one of {KINDS}")
  return base if kind == "eval" else f"{base}_train"


def train_cutoff(prefix_length: int, holdout: int = DEFAULT_RATIONALE_HOLDOUT) -> int:
  """Items a training rationale is written from: all but the last `holdout`, keeping at
  least half of the prefix (and one item)."""
  if holdout < 1:
    raise ValueError(f"--rationale_holdout must be >= 1, got {holdout}")
  return max(1, prefix_length - min(holdout, prefix_length // 2))


def cutoff(dataset: SequenceDataset, user: int, kind: str,
           holdout: int = DEFAULT_RATIONALE_HOLDOUT) -> int:
  """How many training-prefix items the `kind` rationale of `user` is written from."""
  n = len(dataset.train_prefix(user))
  if kind not in KINDS:
    raise ValueError(f"unknown rationale kind {kind!r}; one of {KINDS}")
  return n if kind == "eval" else train_cutoff(n, holdout)


def history_items(dataset: SequenceDataset, user: int,
                  max_history: int = DEFAULT_MAX_HISTORY,
                  cutoff: int | None = None) -> list[int]:
  """The item ids a prompt shows: the most recent `max_history` of the first `cutoff`
  items of the training prefix (None: all of it)."""
  if max_history < 1:
    raise ValueError(f"max_history must be >= 1, got {max_history}")
  prefix = dataset.train_prefix(user)
  if cutoff is not None:
    prefix = prefix[:cutoff]
  return [int(i) for i in prefix[-max_history:]]


def render_history(dataset: SequenceDataset, item_ids: list[int]) -> str:
  return "\n".join(f"{n}. {describe_item(dataset.item(i))}" for n, i in enumerate(item_ids, 1))


def build_messages(dataset: SequenceDataset, user: int, *,
                   template: PromptTemplate | None = None,
                   max_history: int = DEFAULT_MAX_HISTORY,
                   cutoff: int | None = None) -> list[dict]:
  """The chat prompt p'_u for dense user id `user`, from the first `cutoff` items of its
  training prefix (None: all of it)."""
  template = template or PromptTemplate()
  items = history_items(dataset, user, max_history, cutoff)
  return template.render(render_history(dataset, items), len(items))


# ----------------------------------------------------------------------------- parsing

_NUMBER_WORDS = {"1": 1, "2": 2, "3": 3, "one": 1, "two": 2, "three": 3}
# Decoration a model may put before a step marker at the start of a line.
_LEAD = r"^(?P<indent>[ \t]*)(?:>\s*)?(?:#{1,6}\s*)?(?:[-*+]\s+)?(?P<bold>\*\*|__)?\s*"
# "Step 1:", "**Step 2.**", "### STEP THREE", "Step (1)".
_STEP_WORD = re.compile(
    _LEAD + r"step\s*\(?(?P<n>[123]|one|two|three)\)?(?![\w.]\d)", re.I | re.M)


@dataclasses.dataclass(frozen=True)
class _Marker:
  start: int  # where the marker's line starts
  end: int  # where the step's text starts
  step: int
  indent: int
  bold: str = ""  # an opening '**' or '__' whose closing pair is on the marker's line


def _markers(text: str) -> list[_Marker]:
  return [_Marker(m.start(), m.end(), _NUMBER_WORDS[m.group("n").lower()],
                  len(m.group("indent")), m.group("bold") or "")
          for m in _STEP_WORD.finditer(text)]


def _select(markers: list[_Marker]) -> list[_Marker]:
  """Steps in increasing order, at the indentation of the first one, each taken once."""
  chosen: list[_Marker] = []
  for marker in sorted(markers, key=lambda m: m.start):
    if chosen and (marker.step <= chosen[-1].step or marker.indent != chosen[0].indent):
      continue
    chosen.append(marker)
  return chosen


def _clean(text: str) -> str:
  text = text.strip()
  text = re.sub(r"^[\s:.)\-–—*_]+", "", text)  # ": Preferences", "**", "- " left by the marker
  return text.strip()


def parse_steps(response: str) -> dict[str, str | None] | None:
  """Splits a rationale into {'step1', 'step2', 'step3'} at explicit "Step N" markers;
  None when fewer than two are found. A missing step is None."""
  if not isinstance(response, str) or not response.strip():
    return None
  chosen = _select(_markers(response))
  if len(chosen) < 2:
    return None
  steps: dict[str, str | None] = {key: None for key in STEP_KEYS}
  for index, marker in enumerate(chosen):
    stop = chosen[index + 1].start if index + 1 < len(chosen) else len(response)
    body = response[marker.end:stop]
    if marker.bold:  # drop the closing '**' of "**Step 1: Preferences**"
      first_line, newline, rest = body.partition("\n")
      body = first_line.replace(marker.bold, "", 1) + newline + rest
    steps[STEP_KEYS[marker.step - 1]] = _clean(body) or None
  return steps if sum(v is not None for v in steps.values()) >= 2 else None
