"""The package layout (docs/architecture.md): one import path per public name, dependency arrows that point one way,
no module reaching into another's private names (except the PEFT internals listed in docs/architecture.md), and
importing the package patches nothing else."""

from __future__ import annotations

import ast
import importlib
import os
import sys

import pytest

import fairnet_peft

PACKAGE_DIR = os.path.dirname(fairnet_peft.__file__)
REPO = os.path.dirname(PACKAGE_DIR)

#: Private names of other libraries we import, each with its reason in docs/architecture.md ("PEFT internals").
ALLOWED_PRIVATE_IMPORTS = {("peft.tuners.tuners_utils", "_remove_adapter_name_from_state_dict_key"),
                           ("peft.tuners._buffer_dict", "BufferDict")}

#: Which of our sub-packages each may import (docs/architecture.md "dependency arrows").
ALLOWED_ARROWS = {
    "tuner": {"tuner"},
    "data": {"data", "evaluation"},  # evaluation.counting: the empty-cell spellings the metrics share
    "metrics": {"metrics", "evaluation"},
    "evaluation": {"evaluation", "metrics", "tuner"},
    "training": {"training", "tuner", "evaluation", "metrics", "data"},  # data.sampling: the eval set's split
}


def _modules():
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path, name == "__init__.py"


def _imports(module: str, path: str, is_package: bool):
    """(imported module, imported name or None) for every import statement in the file, relative ones resolved."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                yield base, alias.name


def test_old_flat_module_paths_are_gone_and_metrics_is_a_real_module():
    for old in ("gate", "trainer", "datasets", "detector", "sweep", "training_args", "config"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"fairnet_peft.{old}")
    metrics = importlib.import_module("fairnet_peft.metrics")
    assert metrics.__file__ == os.path.join(PACKAGE_DIR, "metrics.py")
    assert fairnet_peft.metrics is metrics
    assert not [f for f in sys.meta_path if type(f).__module__.startswith("fairnet_peft")]


def test_every_public_name_has_one_home():
    """Each name in fairnet_peft.__all__ is defined in exactly one of our modules (re-exports are the same object)."""
    for name in fairnet_peft.__all__:
        obj = getattr(fairnet_peft, name)
        home = getattr(obj, "__module__", None) or obj.__name__
        assert home.startswith("fairnet_peft"), (name, home)


def test_dependency_arrows_point_one_way():
    bad = []
    for module, path, is_package in _modules():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED_ARROWS:
            continue
        for target, _ in _imports(module, path, is_package):
            tparts = target.split(".")
            if tparts[0] == "fairnet_peft" and len(tparts) > 1 and tparts[1] not in ALLOWED_ARROWS[parts[1]]:
                bad.append(f"{module} imports {target}")
    assert bad == []


def test_no_module_imports_another_modules_private_names():
    bad = []
    for module, path, is_package in _modules():
        for target, name in _imports(module, path, is_package):
            private_name = bool(name) and name.startswith("_") and not name.startswith("__") and name != "_register"
            private_module = any(p.startswith("_") and not p.startswith("__") for p in target.split(".")[1:])
            if (private_name or private_module) and not target.startswith("fairnet_peft._registration"):
                if (target, name) not in ALLOWED_PRIVATE_IMPORTS:
                    bad.append(f"{module}: from {target} import {name}")
    assert bad == []


def test_allowed_private_imports_are_documented():
    text = open(os.path.join(REPO, "docs", "architecture.md"), encoding="utf-8").read()
    for module, name in ALLOWED_PRIVATE_IMPORTS:
        assert f"{module}.{name}" in text


def test_an_unknown_name_is_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fairnet_peft.no_such_module")
