"""The package layout (docs/architecture.md): the flat module paths of earlier releases are the same module objects as
their new homes, importing the package patches nothing else, and modules stay short."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import fairnet_peft
from fairnet_peft._aliases import MOVED

PACKAGE_DIR = os.path.dirname(fairnet_peft.__file__)


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_module_paths_are_the_new_modules(old, new):
    module = importlib.import_module(f"fairnet_peft.{old}")
    assert module is importlib.import_module(f"fairnet_peft.{new}")
    assert getattr(fairnet_peft, old) is module  # `from fairnet_peft import metrics` gives the same object


@pytest.mark.slow
def test_old_paths_work_in_a_fresh_interpreter_before_anything_else_is_imported():
    code = ("import fairnet_peft.trainer as t, fairnet_peft.datasets as d; "
            "from fairnet_peft.gate import gate_record; from fairnet_peft import training_args; "
            "import fairnet_peft.training.trainer as nt, fairnet_peft.data as nd; "
            "print(t is nt, d is nd, gate_record is __import__('fairnet_peft').gate_record, "
            "training_args.FairTrainingArguments is __import__('fairnet_peft').FairTrainingArguments)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"] * 4


def test_an_unknown_name_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fairnet_peft.no_such_module")


def test_no_package_module_is_over_about_500_lines():
    sizes = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    sizes[os.path.relpath(path, PACKAGE_DIR)] = sum(1 for _ in f)
    assert len(sizes) > 30
    assert {k: v for k, v in sizes.items() if v > 520} == {}
