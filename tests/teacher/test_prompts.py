"""The three-step prompt: history from the training prefix only, templates, step parsing."""

import pytest

from slim_jax.data.dataset import Item, SequenceDataset
from slim_jax.teacher import prompts
from teacher_fakes import make_dataset

import numpy as np


def test_no_prompt_contains_a_valid_or_test_item():
  dataset = make_dataset(num_users=50, num_items=60, seed=3)
  for user in range(dataset.num_users):
    text = "\n".join(m["content"] for m in prompts.build_messages(dataset, user))
    for target in (dataset.valid_target(user), dataset.test_target(user)):
      assert dataset.item(target).title not in text, (user, target)
    for item in dataset.train_prefix(user):
      assert dataset.item(int(item)).title in text


def test_history_in_time_order_capped_to_most_recent():
  dataset = make_dataset(num_users=5, seed=1)
  user = max(range(5), key=lambda u: len(dataset.sequences[u]))
  prefix = [int(i) for i in dataset.train_prefix(user)]
  assert prompts.history_items(dataset, user, max_history=3) == prefix[-3:]
  text = prompts.build_messages(dataset, user, max_history=3)[-1]["content"]
  positions = [text.index(dataset.item(i).title) for i in prefix[-3:]]
  assert positions == sorted(positions)
  assert dataset.item(prefix[-4]).title not in text
  assert "3 items" in text
  with pytest.raises(ValueError, match="max_history"):
    prompts.history_items(dataset, user, max_history=0)


def test_item_line_is_the_item_description_or_its_fields():
  movie = Item(1, "1", "Toy Story", "", ("Animation", "Comedy"),
               "Title: Toy Story; Year: 1995; Genres: Animation, Comedy")
  assert prompts.describe_item(movie) == movie.text  # MovieLens: genres and year
  item = Item(1, "x", "Mario", "Nintendo", ("Games", " "), "")
  assert prompts.describe_item(item) == "Title: Mario; Brand: Nintendo; Categories: Games"
  item = Item(1, "x", "Zelda", "", (), "")
  assert prompts.describe_item(item) == "Title: Zelda"


def test_default_prompt_asks_three_steps():
  dataset = make_dataset(num_users=2)
  messages = prompts.build_messages(dataset, 0)
  assert [m["role"] for m in messages] == ["system", "user"]
  user = messages[1]["content"]
  for step in ("Step 1:", "Step 2:", "Step 3:"):
    assert step in user
  assert "preferences" in user and "brands and categories" in user


def test_template_from_file(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("Be brief.\n---\nHistory ({num_items}):\n{history}\nUse {{json}}.\n")
  template = prompts.load_template(str(path))
  dataset = make_dataset(num_users=2)
  messages = prompts.build_messages(dataset, 0, template=template)
  assert messages[0] == {"role": "system", "content": "Be brief."}
  n = len(dataset.train_prefix(0))
  assert messages[1]["content"].startswith(f"History ({n}):\n1. ")
  assert messages[1]["content"].endswith("Use {json}.")
  path.write_text("No system part: {history}")
  assert [m["role"] for m in prompts.build_messages(
      dataset, 0, template=prompts.load_template(str(path)))] == ["user"]


@pytest.mark.parametrize("text,match", [
    ("no placeholder here", "has no {history} placeholder"),
    ("{history} and {user_name}", "uses the placeholder {user_name}"),
    ("{history} and {oops", "literal braces"),
    ("a\n---\nb\n---\n{history}", "are all '---'"),
])
def test_bad_template_names_the_file_and_the_fix(tmp_path, text, match):
  path = tmp_path / "bad.txt"
  path.write_text(text)
  with pytest.raises(ValueError, match=match) as info:
    prompts.load_template(str(path))
  assert str(path) in str(info.value)


def test_missing_template_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    prompts.load_template(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("response,expected", [
    ("Step 1: likes RPGs.\nStep 2: Nintendo; RPG.\nStep 3: Zelda.",
     ("likes RPGs.", "Nintendo; RPG.", "Zelda.")),
    ("Sure!\n\n**Step 1: Preferences**\nLikes RPGs.\n\n**Step 2:** Nintendo.\n\n"
     "**Step 3 - Items**\n1. Zelda\n2. Mario\n3. Kirby",
     ("Preferences\nLikes RPGs.", "Nintendo.", "Items\n1. Zelda\n2. Mario\n3. Kirby")),
    ("### Step 1\nlikes RPG\n### Step 2\nNintendo\n### Step 3\nZelda",
     ("likes RPG", "Nintendo", "Zelda")),
    ("STEP ONE: likes RPG\nStep two: Nintendo\nStep Three: Zelda",
     ("likes RPG", "Nintendo", "Zelda")),
    ("Step 1: likes\n1. Star Wars (1977)\n2. Fargo (1996)\nStep 2: Drama\nStep 3: Heat",
     ("likes\n1. Star Wars (1977)\n2. Fargo (1996)", "Drama", "Heat")),
    ("Step 1: likes RPGs.\nStep 3: Zelda.", ("likes RPGs.", None, "Zelda.")),
    ("Rated 1.5 stars on average.\nStep 2: Nintendo\nStep 3: Zelda",
     (None, "Nintendo", "Zelda")),
])
def test_parse_steps_tolerates_real_answer_shapes(response, expected):
  steps = prompts.parse_steps(response)
  assert steps is not None
  assert (steps["step1"], steps["step2"], steps["step3"]) == expected


@pytest.mark.parametrize("response", [
    "", "   ", "I cannot help with that.", "Step 1: only one step here.",
    "The user likes RPGs and Nintendo; try Zelda.",
    # Bare numbering and headings are list slots, not steps (issue 18).
    "1. Star Wars (1977)\n2. Fargo (1996)\n3. Heat (1995)",
    "(1) likes RPG\n(2) Nintendo\n(3) Zelda",
    "**1.** likes RPG\n**2.** Nintendo\n**3.** Zelda",
    "## User preferences\nlikes RPG\n## Recommended brands and categories\nNintendo\n"
    "## Recommended items\nZelda",
])
def test_parse_steps_returns_none_without_structure(response):
  assert prompts.parse_steps(response) is None


def test_prefix_only_even_for_short_users():
  # Three interactions: one training item, then the valid and test items.
  items = [Item(i, str(i), f"Title{i}", "", (), "") for i in range(1, 4)]
  dataset = SequenceDataset(items, ["u"], [np.array([1, 2, 3], np.int32)],
                            [np.array([1, 2, 3], np.int64)])
  text = prompts.build_messages(dataset, 0)[-1]["content"]
  assert "Title1" in text and "Title2" not in text and "Title3" not in text


def test_training_prompt_stops_at_its_cutoff():
  dataset = make_dataset(num_users=12, num_items=40)  # distinct items per user
  for user in range(dataset.num_users):
    prefix = [int(i) for i in dataset.train_prefix(user)]
    for kind in prompts.KINDS:
      c = prompts.cutoff(dataset, user, kind, holdout=5)
      n = len(prefix)
      assert c == (n if kind == "eval" else n - min(5, n // 2)) and (kind == "eval" or c < n)
      text = prompts.build_messages(dataset, user, max_history=100, cutoff=c)[-1]["content"]
      for i in prefix[c:]:  # items after the cutoff (each appears once per user)
        assert prompts.describe_item(dataset.item(i)) not in text
      for i in prefix[:c]:
        assert prompts.describe_item(dataset.item(i)) in text


def test_train_cutoff_keeps_half_of_a_short_prefix():
  assert prompts.train_cutoff(4, holdout=10) == 2
  assert prompts.train_cutoff(1, holdout=10) == 1
  assert prompts.train_cutoff(100, holdout=10) == 90
