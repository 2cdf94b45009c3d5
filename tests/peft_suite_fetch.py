"""Fetch PEFT's own generic tuner tests (for the installed peft version) into the git-ignored `tests/peft_suite/`.

PEFT's wheels do not ship its tests, the sdist does. `ensure_peft_suite()` runs, once per peft version:

    python -m pip download --no-deps --no-binary :all: peft==<installed> -d <tmp>

unpacks the sdist and copies `tests/testing_common.py`, `tests/testing_utils.py` and `tests/test_custom_models.py`
(renamed `custom_models_suite.py`, so pytest does not collect it as is) into the package `tests/peft_suite/`
(with an `__init__.py`; the suite uses relative imports). A `VERSION` file records which peft version the copies
come from; it is written last, so an interrupted fetch is redone. These files are third-party test code: they are
listed in `.gitignore` and must never be committed.

Failures raise `PeftSuiteUnavailable` with the reason (no network, unexpected sdist layout, ...), so the caller can
turn it into a *failing* test rather than a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SUITE_DIR = Path(__file__).resolve().parent / "peft_suite"
# name inside the sdist's tests/ folder -> name in tests/peft_suite/
SUITE_FILES = {
    "testing_common.py": "testing_common.py",
    "testing_utils.py": "testing_utils.py",
    "test_custom_models.py": "custom_models_suite.py",
}
_INIT_TEXT = (
    '"""PEFT\'s generic tests, fetched at test time by tests/peft_suite_fetch.py. Git-ignored: never commit."""\n'
)
PIP_TIMEOUT_S = 300


class PeftSuiteUnavailable(RuntimeError):
    """PEFT's test suite could not be fetched; the message says why and how to fix it."""


def installed_peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def _is_current(version: str) -> bool:
    marker = SUITE_DIR / "VERSION"
    if not marker.is_file() or marker.read_text().strip() != version:
        return False
    return (SUITE_DIR / "__init__.py").is_file() and all((SUITE_DIR / dst).is_file() for dst in SUITE_FILES.values())


def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}",
           "-d", str(dest), "--disable-pip-version-check", "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise PeftSuiteUnavailable(f"`{' '.join(cmd)}` timed out after {PIP_TIMEOUT_S} s (no network?).") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise PeftSuiteUnavailable(
            f"Could not download the peft=={version} sdist, which holds PEFT's generic tests.\n"
            f"Command: {' '.join(cmd)}\nExit status {proc.returncode}; pip said:\n{tail}\n"
            "These tests need network access to PyPI once per peft version (the files are then kept in the "
            f"git-ignored {SUITE_DIR}). Alternatively unpack the sdist yourself and copy "
            f"{', '.join(f'tests/{s} -> {d}' for s, d in SUITE_FILES.items())} there, with a VERSION file "
            f"containing {version} and an __init__.py."
        )
    sdists = sorted(dest.glob("peft-*.tar.gz"))
    if not sdists:
        raise PeftSuiteUnavailable(f"pip download of peft=={version} succeeded but left no peft-*.tar.gz in {dest}.")
    return sdists[0]


def _extract(sdist: Path, version: str, staging: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for src, dst in SUITE_FILES.items():
            # The sdist root is normally peft-<version>/ but do not rely on its exact spelling.
            hits = [n for n in members if n.endswith(f"/tests/{src}") and n.count("/") == 2]
            if not hits:
                raise PeftSuiteUnavailable(
                    f"The peft=={version} sdist {sdist.name} has no tests/{src}; this peft release's layout is not "
                    "supported by tests/peft_suite_fetch.py."
                )
            fileobj = tar.extractfile(members[hits[0]])
            (staging / dst).write_bytes(fileobj.read())


def ensure_peft_suite(version: str | None = None) -> Path:
    """Make sure `tests/peft_suite/` holds the generic tests of `version` (default: the installed peft)."""
    version = version or installed_peft_version()
    if _is_current(version):
        return SUITE_DIR
    with tempfile.TemporaryDirectory(prefix="peft-sdist-") as tmp:
        tmp = Path(tmp)
        sdist = _download_sdist(version, tmp / "dl")
        staging = tmp / "staging"
        staging.mkdir()
        _extract(sdist, version, staging)
        SUITE_DIR.mkdir(exist_ok=True)
        (SUITE_DIR / "VERSION").unlink(missing_ok=True)  # invalid until every file is in place
        init = SUITE_DIR / "__init__.py"
        if not init.is_file():
            init.write_text(_INIT_TEXT)
        for dst in SUITE_FILES.values():
            tmp_target = SUITE_DIR / f".{dst}.{os.getpid()}.tmp"
            shutil.copyfile(staging / dst, tmp_target)
            os.replace(tmp_target, SUITE_DIR / dst)  # atomic: a concurrent run never sees half a file
        (SUITE_DIR / "VERSION").write_text(version + "\n")
    return SUITE_DIR


if __name__ == "__main__":  # `python -m tests.peft_suite_fetch` prefetches the suite
    print(ensure_peft_suite())
