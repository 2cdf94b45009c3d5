"""Every in-repo Markdown link to a section (`docs/x.md#anchor`, `(#anchor)`) names a heading that exists, with
GitHub's anchor rule (lower case, punctuation dropped, spaces to hyphens), so renaming a heading cannot leave a dead
link behind."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]*?)#([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    found, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


def test_github_anchor_rule():
    assert github_anchor(" Label-free selection of τ") == "label-free-selection-of-τ"
    assert github_anchor("Detector stage stopped at the detector's layer") == \
        "detector-stage-stopped-at-the-detectors-layer"


def test_every_section_link_names_an_existing_heading():
    dead = []
    for doc in DOCS:
        for target, anchor in LINK.findall(doc.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            path = doc if not target else (doc.parent / target).resolve()
            assert path.exists(), f"{doc.name} links to {target}, which does not exist"
            if anchor not in anchors(path):
                dead.append(f"{doc.relative_to(ROOT)} → {target or doc.name}#{anchor}")
    assert not dead, "links to headings that do not exist:\n" + "\n".join(dead)
