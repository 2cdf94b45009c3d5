"""The defaults docs/api.md documents are the dataclasses' defaults: every row of the FairLoraConfig and
FairTrainingArguments tables names a real field, its default column equals the field's default, and every FairNet
field is documented."""

from __future__ import annotations

import ast
import dataclasses
import os
import re

import pytest
from transformers import TrainingArguments

from fairnet_peft import FairLoraConfig, FairTrainingArguments

API = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "api.md")
ROW = re.compile(r"^\| `(\w+)` \| ([^|]+) \|")


def _section(text: str, heading: str) -> str:
    start = text.index(f"## `{heading}`")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def documented(heading: str) -> dict[str, str]:
    text = open(API, encoding="utf-8").read()
    return {m.group(1): m.group(2).strip() for line in _section(text, heading).splitlines() if (m := ROW.match(line))}


def parse_default(cell: str):
    """The value a default cell states: `**1e-3**` → 0.001, `None → L // 2` → None, `"auto"` → 'auto'."""
    value = cell.replace("**", "").replace("`", "").split("→")[0].strip()
    return ast.literal_eval(value)


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


@pytest.mark.parametrize("cls, heading, base", [(FairLoraConfig, "FairLoraConfig", None),
                                                (FairTrainingArguments, "FairTrainingArguments", TrainingArguments)])
def test_documented_defaults_are_the_dataclass_defaults(cls, heading, base):
    rows = documented(heading)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert rows, f"no field table found under {heading}"
    unknown = sorted(set(rows) - set(fields))
    assert unknown == [], f"docs/api.md documents fields {heading} does not have"
    wrong = {name: (cell, _default(fields[name])) for name, cell in rows.items()
             if parse_default(cell) != _default(fields[name])}
    assert wrong == {}, "docs/api.md default ≠ the dataclass default (cell, real)"
    own = {f.name for f in dataclasses.fields(cls)} - ({f.name for f in dataclasses.fields(base)} if base else set())
    if base is None:  # FairLoraConfig: the PeftConfig base's own fields are PEFT's to document
        from peft.config import PeftConfig

        own -= {f.name for f in dataclasses.fields(PeftConfig)}
    missing = sorted(own - set(rows))
    assert missing == [], f"{heading} fields missing from docs/api.md"


def test_the_parser_reads_each_cell_form():
    assert parse_default("**1e-3**") == 0.001
    assert parse_default("None → L // 2") is None
    assert parse_default('`"auto"`') == "auto"
    assert parse_default("`[128, 64]`") == [128, 64]
    with pytest.raises((ValueError, SyntaxError)):
        parse_default("the hidden size")
