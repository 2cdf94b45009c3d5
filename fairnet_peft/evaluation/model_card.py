"""Writing the "Fairness evaluation" section into an adapter's model card (`README.md`); the text is `report`'s.

* `write_model_card(adapter_dir, metrics, split="test")` writes/updates the section in a saved adapter folder.
* `attach_fairness_report(model, metrics, split="test")` keeps the metrics on that `PeftModel` instance (in its
  `__dict__`, never in the JSON config) and wraps the instance's `create_or_update_model_card` /
  `_upload_modified_files`, so its later `save_pretrained` / `push_to_hub` write the section. No PEFT class changes;
  `install_model_card_hook` (class-level, deprecated) is kept for code that calls it.

The section sits between HTML markers named after the adapter, so updating replaces it, and each adapter keeps its own.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .report import (SECTION_TITLE, clean_metrics, current_selection_report, model_class_names, render_fairness_section,
                     render_fairness_table, section_markers)

__all__ = [
    "SECTION_TITLE",
    "attach_fairness_report",
    "detach_fairness_report",
    "fairness_report",
    "install_model_card_hook",
    "render_fairness_section",
    "uninstall_model_card_hook",
    "update_card_text",
    "write_model_card",
]

REPORT_ATTR = "_fairnet_fairness_reports"
_HOOK_FLAG = "_fairnet_fairness_hook"


def update_card_text(text: str, section: str, adapter_name: str = "default") -> str:
    """`text` with the adapter's section replaced, or appended (after a blank line) if it has none yet."""
    start, end = section_markers(adapter_name)
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    text = text.rstrip("\n")
    return (text + "\n\n" if text else "") + section


def _update_readme(directory: Union[str, os.PathLike], sections: Mapping[str, str]) -> Path:
    path = Path(directory) / "README.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for adapter_name, section in sections.items():
        text = update_card_text(text, section, adapter_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _config_from_dir(directory: Path, adapter_name: str) -> dict:
    """The saved adapter_config.json as a dict (non-default adapters are saved in a sub-folder named after them);
    {} when there is none or it cannot be read."""
    for candidate in (directory / adapter_name / "adapter_config.json", directory / "adapter_config.json"):
        if candidate.exists():
            try:
                config = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            return config if isinstance(config, dict) else {}
    return {}


def _threshold(config: Mapping[str, Any]) -> Optional[float]:
    value = config.get("threshold")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _saved_selection(config: Mapping[str, Any]) -> Optional[dict]:
    """The config's `selection_report` (how FairTrainer chose τ and α) while τ and α are still the chosen ones."""
    return current_selection_report(config.get("selection_report"), config.get("threshold"),
                                    config.get("adapter_strength", 1.0))


def _model_config(model, adapter_name: str) -> dict:
    config = getattr(model, "peft_config", {}).get(adapter_name)
    return {k: getattr(config, k) for k in ("threshold", "adapter_strength", "selection_report")
            if hasattr(config, k)}


# ---------------------------------------------------------------------- attached reports
def _is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def attach_fairness_report(model, metrics: Mapping[str, Any], *, split: str,
                           adapter_name: Optional[str] = None, selection: Optional[Mapping[str, Any]] = None) -> None:
    """Keep `metrics` (measured on `split`) on `model`, so `save_pretrained`/`push_to_hub` put them in the card.

    `model` is a `PeftModel`; `adapter_name` defaults to its active adapter. `metrics` is a `make_compute_metrics`
    / `Trainer.evaluate` dict (`eval_`/`test_`/`{split}_` prefixes are fine, non-metric entries are ignored). A new
    report for the same adapter replaces the old one. The table is rendered now, so bad input fails here and not
    at save time. The report lives on this model instance only: it is not saved in adapter_config.json.
    The card also says how τ and the strength were chosen, and the searched frontier: from `selection` (a
    FairTrainer `run_state.selection`) when given, else from the adapter config's `selection_report`, which
    FairTrainer writes and `save_pretrained` saves, so an adapter loaded and evaluated again keeps that text (not
    once τ or α has been changed by hand: the text would no longer describe the adapter).
    """
    if not _is_peft_model(model):
        raise TypeError(
            f"attach_fairness_report needs a peft.PeftModel (got {type(model).__name__}): the card is written by "
            "PeftModel.save_pretrained/push_to_hub. For a saved adapter folder use write_model_card(path, ...)."
        )
    if adapter_name is None:
        adapter_name = model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"attach_fairness_report: no adapter {adapter_name!r} (adapters: {list(model.peft_config)})")
    clean = clean_metrics(metrics)
    render_fairness_table(clean, split=split)  # validates split and that some known metric is present
    _hook_instance(model)
    model.__dict__.setdefault(REPORT_ATTR, {})[adapter_name] = {
        "metrics": clean, "split": split, "selection": None if selection is None else dict(selection)}


def fairness_report(model, adapter_name: Optional[str] = None) -> Optional[dict]:
    """The attached report `{"metrics": {...}, "split": ...}` of `adapter_name` (default: active), or None."""
    reports = model.__dict__.get(REPORT_ATTR) or {}
    if adapter_name is None:
        adapter_name = getattr(model, "active_adapter", "default")
    return reports.get(adapter_name)


def detach_fairness_report(model, adapter_name: Optional[str] = None) -> None:
    """Forget the attached report of `adapter_name`, or of every adapter when None."""
    reports = model.__dict__.get(REPORT_ATTR)
    if not reports:
        return
    if adapter_name is None:
        reports.clear()
    else:
        reports.pop(adapter_name, None)


def _attached_sections(model) -> dict[str, str]:
    reports = model.__dict__.get(REPORT_ATTR) or {}
    sections = {}
    for name, report in reports.items():
        if name in model.peft_config:
            config = _model_config(model, name)
            selection = report.get("selection")
            sections[name] = render_fairness_section(
                report["metrics"], split=report["split"], adapter_name=name, threshold=_threshold(config),
                selection=_saved_selection(config) if selection is None else selection,
                class_names=model_class_names(model))
    return sections


# ---------------------------------------------------------------------- writing a folder
def write_model_card(model_or_dir, metrics: Mapping[str, Any], *, split: str,
                     adapter_name: str = "default") -> Optional[Path]:
    """Write or update the "Fairness evaluation" section of a model card.

    * `model_or_dir` a folder (`str`/`PathLike`, e.g. what `save_pretrained` wrote): its README.md gets the section
      (created if missing; an existing section of the same adapter is replaced, the rest of the card is kept). τ,
      and how FairTrainer chose it (`selection_report`), are read from the folder's adapter_config.json. Returns
      the README path.
    * `model_or_dir` a `PeftModel`: same as `attach_fairness_report(model, metrics, split=..., adapter_name=...)`;
      the section is written by its next `save_pretrained`/`push_to_hub`. Returns None.
    """
    if not isinstance(model_or_dir, (str, os.PathLike)):
        attach_fairness_report(model_or_dir, metrics, split=split, adapter_name=adapter_name)
        return None
    directory = Path(model_or_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"write_model_card: {directory} is a file; pass the adapter folder")
    config = _config_from_dir(directory, adapter_name)
    section = render_fairness_section(metrics, split=split, adapter_name=adapter_name, threshold=_threshold(config),
                                      selection=_saved_selection(config))
    return _update_readme(directory, {adapter_name: section})


# ---------------------------------------------------------------------- the PEFT hook
def _hook_instance(model) -> None:
    """Make this model's `save_pretrained` / `push_to_hub` write its attached reports: the two PeftModel methods
    that write and upload the card are wrapped on the instance only, so no other model and no PEFT class changes."""
    if model.__dict__.get("_fairnet_card_hooked"):
        return
    card, upload = type(model).create_or_update_model_card, type(model)._upload_modified_files

    def create_or_update_model_card(output_dir: str):
        result = card(model, output_dir)
        sections = _attached_sections(model)
        if sections:
            _update_readme(output_dir, sections)
        return result

    def _upload_modified_files(working_dir, *args, **kwargs):
        # transformers' push_to_hub replaced README.md (after save_pretrained) with the Hub's card or a template
        if _attached_sections(model):
            model.create_or_update_model_card(working_dir)
        return upload(model, working_dir, *args, **kwargs)

    model.__dict__.update(create_or_update_model_card=create_or_update_model_card,
                          _upload_modified_files=_upload_modified_files, _fairnet_card_hooked=True)


def install_model_card_hook() -> None:
    """Deprecated: patch the `PeftModel` class so every model's `save_pretrained` / `push_to_hub` writes attached
    fairness reports. Nothing calls it any more: `attach_fairness_report` hooks the one model it is given, and
    `import fairnet_peft` changes nothing in PEFT besides registering FAIRLORA. Kept for code that calls it. Idempotent."""
    from peft import PeftModel

    card = PeftModel.create_or_update_model_card
    if not getattr(card, _HOOK_FLAG, False):
        @functools.wraps(card)
        def create_or_update_model_card(self, output_dir: str):
            result = card(self, output_dir)
            sections = _attached_sections(self)
            if sections:
                _update_readme(output_dir, sections)
            return result

        setattr(create_or_update_model_card, _HOOK_FLAG, True)
        create_or_update_model_card.__fairnet_original__ = card
        PeftModel.create_or_update_model_card = create_or_update_model_card

    upload = PeftModel._upload_modified_files
    if not getattr(upload, _HOOK_FLAG, False):
        @functools.wraps(upload)
        def _upload_modified_files(self, working_dir, *args, **kwargs):
            # transformers' push_to_hub replaced README.md (after save_pretrained) with the Hub's card or a template
            if _attached_sections(self):
                self.create_or_update_model_card(working_dir)
            return upload(self, working_dir, *args, **kwargs)

        setattr(_upload_modified_files, _HOOK_FLAG, True)
        _upload_modified_files.__fairnet_original__ = upload
        _upload_modified_files.__fairnet_own__ = "_upload_modified_files" in PeftModel.__dict__
        PeftModel._upload_modified_files = _upload_modified_files


def uninstall_model_card_hook() -> None:
    """Undo `install_model_card_hook` (for tests)."""
    from peft import PeftModel

    card = PeftModel.__dict__.get("create_or_update_model_card")
    if getattr(card, _HOOK_FLAG, False):
        PeftModel.create_or_update_model_card = card.__fairnet_original__
    upload = PeftModel.__dict__.get("_upload_modified_files")
    if getattr(upload, _HOOK_FLAG, False):
        if upload.__fairnet_own__:
            PeftModel._upload_modified_files = upload.__fairnet_original__
        else:
            del PeftModel._upload_modified_files
