"""The README's quick start runs as written (offline, in a temporary working directory)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    quick = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "tensor(" in proc.stdout  # the risk scores and gates were printed


def test_readme_links_every_doc_page():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for page in ("method.md", "api.md", "label-settings.md", "hub.md", "benchmarks.md"):
        assert f"docs/{page}" in readme and os.path.exists(os.path.join(ROOT, "docs", page))
