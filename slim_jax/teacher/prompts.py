"""The three-step chain-of-thought prompt p'_u and the parser that splits a rationale r'_u.

SLIM asks the teacher (and later the student) for a rationale in three steps: (1) the
user's preferences, (2) brands and categories that fit them, (3) items that fit those. The
prompt lists the user's history from the item table, oldest first, taken from the TRAINING
PREFIX ONLY (`SequenceDataset.train_prefix`): the validation and test items never reach a
prompt. Long histories keep the most recent `max_history` items.

The user message comes from a template with a `{history}` placeholder (and optionally
`{num_items}`). A replacement template is a UTF-8 text file in the same form; a line holding
only `---` splits it into a system message (above) and the user message (below). Literal
braces are written `{{` and `}}`, as in `str.format`.

`parse_steps` splits an answer into its steps. Real models number steps in many ways
("Step 1:", "**Step 1**", "### Step 1", "1.", "1)", "(1)", headings named after the step),
and sometimes skip one; the parser returns the steps it found (a missing one is None) and
returns None when it cannot find the structure at all, so the caller keeps the raw text and
records the failure instead of dropping the user.
"""

from __future__ import annotations

import dataclasses
import re
import string

from slim_jax.data import raw
from slim_jax.data.dataset import Item, SequenceDataset

DEFAULT_MAX_HISTORY = 50

DEFAULT_SYSTEM = ("You are an expert recommender system. You reason step by step about a "
                  "user's history and answer concisely.")

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


def history_items(dataset: SequenceDataset, user: int,
                  max_history: int = DEFAULT_MAX_HISTORY) -> list[int]:
  """The item ids a prompt shows: the most recent `max_history` of the training prefix."""
  if max_history < 1:
    raise ValueError(f"max_history must be >= 1, got {max_history}")
  prefix = dataset.train_prefix(user)
  return [int(i) for i in prefix[-max_history:]]


def render_history(dataset: SequenceDataset, item_ids: list[int]) -> str:
  return "\n".join(f"{n}. {describe_item(dataset.item(i))}" for n, i in enumerate(item_ids, 1))


def build_messages(dataset: SequenceDataset, user: int, *,
                   template: PromptTemplate | None = None,
                   max_history: int = DEFAULT_MAX_HISTORY) -> list[dict]:
  """The chat prompt p'_u for dense user id `user`, from its training prefix only."""
  template = template or PromptTemplate()
  items = history_items(dataset, user, max_history)
  return template.render(render_history(dataset, items), len(items))


# ----------------------------------------------------------------------------- parsing

_NUMBER_WORDS = {"1": 1, "2": 2, "3": 3, "one": 1, "two": 2, "three": 3,
                 "first": 1, "second": 2, "third": 3}
# Decoration a model may put before a step marker at the start of a line.
_LEAD = r"^(?P<indent>[ \t]*)(?:>\s*)?(?:#{1,6}\s*)?(?:[-*+]\s+)?(?P<bold>\*\*|__)?\s*"
# Tier 1: the word "step" ("Step 1:", "**Step 2.**", "### STEP THREE", "Step (1)").
_STEP_WORD = re.compile(
    _LEAD + r"step\s*\(?(?P<n>[123]|one|two|three)\)?(?![\w.]\d)", re.I | re.M)
# Tier 2: bare numbering at the start of a line ("1.", "2)", "(3)", "**1.**", "## 2:").
_NUMBERED = re.compile(
    _LEAD + r"(?:\((?P<p>[123])\)|(?P<n>[123])[.):])(?=[\s*_]|$)", re.M)
# Tier 3: a heading or a short line ending in ':' named after a step.
_HEADING = re.compile(
    r"^(?P<indent>[ \t]*)(?P<bold>\*\*|__|#{1,6}\s*)?(?P<title>[^\n]{0,80}?)"
    r"(?:\*\*|__)?[ \t]*:?[ \t]*$", re.M)


@dataclasses.dataclass(frozen=True)
class _Marker:
  start: int  # where the marker's line starts
  end: int  # where the step's text starts
  step: int
  indent: int
  bold: str = ""  # an opening '**' or '__' whose closing pair is on the marker's line


def _markers_from(pattern: re.Pattern, text: str) -> list[_Marker]:
  markers = []
  for m in pattern.finditer(text):
    number = m.group("n") or m.groupdict().get("p")
    markers.append(_Marker(m.start(), m.end(), _NUMBER_WORDS[number.lower()],
                           len(m.group("indent")), m.group("bold") or ""))
  return markers


def _heading_markers(text: str) -> list[_Marker]:
  markers = []
  for m in _HEADING.finditer(text):
    line = m.group(0)
    decorated = bool(m.group("bold")) or line.rstrip().endswith(":")
    title = m.group("title").lower()
    if not decorated or not title.strip() or len(title) > 80:
      continue
    if "brand" in title or "categor" in title:
      step = 2
    elif "prefer" in title:
      step = 1
    elif "item" in title or "recommend" in title or "product" in title:
      step = 3
    else:
      continue
    markers.append(_Marker(m.start(), m.end(), step, len(m.group("indent"))))
  return markers


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
  """Splits a rationale into {'step1', 'step2', 'step3'}; None when no structure is found.

  At least two of the three steps must be found; a missing step is None. Explicit
  "Step N" markers win over bare numbering, which wins over headings named after a step
  ("Preferences", "Brands and categories", "Recommended items"): a numbered list of items
  inside step 3 is then not mistaken for steps.
  """
  if not isinstance(response, str) or not response.strip():
    return None
  for finder in (lambda t: _markers_from(_STEP_WORD, t), lambda t: _markers_from(_NUMBERED, t),
                 _heading_markers):
    chosen = _select(finder(response))
    if len(chosen) < 2:
      continue
    steps: dict[str, str | None] = {key: None for key in STEP_KEYS}
    for index, marker in enumerate(chosen):
      stop = chosen[index + 1].start if index + 1 < len(chosen) else len(response)
      body = response[marker.end:stop]
      if marker.bold:  # drop the closing '**' of "**Step 1: Preferences**"
        first_line, newline, rest = body.partition("\n")
        body = first_line.replace(marker.bold, "", 1) + newline + rest
      steps[STEP_KEYS[marker.step - 1]] = _clean(body) or None
    if sum(v is not None for v in steps.values()) >= 2:
      return steps
  return None
