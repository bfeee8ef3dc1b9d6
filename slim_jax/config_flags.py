"""Experiment flags as overrides of frozen config dataclasses: the dataclass is the only
source of a default, a flag names the (dotted) field it sets.

  FIELDS = {"lora_rank": "lora.rank", "max_length": "max_length"}
  flags.DEFINE_integer("lora_rank", config_flags.default(DistillConfig(), "lora.rank"), ...)
  config = config_flags.override(DistillConfig(), {FIELDS[f]: FLAGS[f].value for f in FIELDS})

tests/experiments/test_flag_defaults.py checks every script's flag defaults against its
fields, so a default written by hand cannot drift from the dataclass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def default(config: Any, path: str) -> Any:
  """The value of the dotted field `path` ('lora.rank') of a config instance."""
  value = config
  for name in path.split("."):
    value = getattr(value, name)
  return value


def field_default(config_class: type, name: str) -> Any:
  """The default of field `name` of a dataclass that has required fields (no instance)."""
  for field in dataclasses.fields(config_class):
    if field.name == name:
      if field.default is not dataclasses.MISSING:
        return field.default
      if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
      raise ValueError(f"{config_class.__name__}.{name} has no default")
  raise KeyError(f"{config_class.__name__} has no field {name!r}")


def override(config: Any, values: Mapping[str, Any]) -> Any:
  """A copy of `config` with each dotted field in `values` replaced (nested dataclasses are
  rebuilt, so their __post_init__ checks run on the new values)."""
  nested: dict[str, dict[str, Any]] = {}
  direct: dict[str, Any] = {}
  for path, value in values.items():
    head, _, rest = path.partition(".")
    if rest:
      nested.setdefault(head, {})[rest] = value
    else:
      direct[head] = value
  for head, sub in nested.items():
    direct[head] = override(getattr(config, head), sub)
  return dataclasses.replace(config, **direct)
