"""The flat module paths of earlier releases, kept as aliases of the modules' new homes.

``import fairnet_peft.metrics`` (or ``datasets``, ``trainer``, ``gate`` ...) imports the new module and binds the old
name to the same module object, so attributes, monkeypatching and ``isinstance`` agree under both names. The
aliases are resolved on first import (nothing heavy loads with the package) by one finder on ``sys.meta_path``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "config": "tuner.config", "layer": "tuner.layer", "detector": "tuner.detector", "gate": "tuner.gate",
    "model": "tuner.model", "representation": "tuner.representation",
    "training_args": "training.arguments", "trainer": "training.trainer", "losses": "training.losses",
    "prototypes": "training.prototypes", "pseudo_labels": "training.pseudo_labels",
    "validation": "training.validation",
    "metrics": "evaluation.metrics", "sweep": "evaluation.sweep", "plots": "evaluation.plots",
    "model_card": "evaluation.model_card",
    "datasets": "data",
}
PACKAGE = __name__.rpartition(".")[0]


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        """The target module ran when `create_module` imported it."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(f"{PACKAGE}.{MOVED[name]}"))


def install() -> None:
    """Put the finder on `sys.meta_path` once (re-imports and reloads do not add a second one)."""
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


