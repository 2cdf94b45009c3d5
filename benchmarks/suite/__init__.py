"""The benchmark suite behind the thin CLIs in benchmarks/: quality, defaults, ablations, selector and overhead.

A run flows: CLI options → `orchestration` (seeds, datasets or tasks, child processes) → `data` (splits, model
factories, the label settings) → `methods` (ERM, GroupDRO, JTT, DFR, AFR; `baselines` holds their trainers and
heads) and `fairnet` (FairNet at the library defaults, and the suite's own grid as an ablation), with `selection`
picking candidates on validation → `report` / `report_defaults` (summaries, tables, results.json and the one writer
of the generated blocks in docs/benchmarks.md). `config` holds the presets and method tables, `common` the small
shared helpers. overhead.py's cost benchmark has its own four: `overhead_models` (models, inference and compiled
variants), `overhead_training` (training-step variants), `overhead_timing` and `overhead_report`. Only public names
of `fairnet_peft` are used.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(BENCH_DIR)
DOC_PATH = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
