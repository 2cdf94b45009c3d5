"""benchmarks/quality.py and benchmarks/gpu_run.sh run end to end at tiny size (no assertions on quality).

`quality.py --tiny` runs in-process: every method row must be in the JSON and the Markdown table, with finite
numbers. The pieces of the suite package (benchmarks/suite/: selection, report, orchestration, baselines) get small
unit checks. `gpu_run.sh --dry-run` runs the whole GPU script on the CPU at tiny
size (CUDA check, overhead, defaults suite, quality) and must leave its JSON files behind.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from suite import baselines, config, orchestration, report, selection  # noqa: E402


def _load(name: str):
    module_name = f"fairnet_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    quality = _load("quality")
    out = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    result = quality.main(["--tiny", "--threads", "1", "--out", str(out), "--doc", str(out / "benchmarks.md")])
    assert torch.get_num_threads() == threads
    return quality, out, result


def test_quality_tiny_has_every_method_and_finite_numbers(tiny_report):
    quality, out, _ = tiny_report
    saved = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert saved["command"].startswith("python benchmarks/quality.py --tiny")
    for dataset in ("text", "vision"):
        block = saved["datasets"][dataset]
        run = block["runs"]["0"]["results"]
        for method in config.METHODS + [config.ORACLE_ROW]:
            assert method in run, (dataset, method)
            for key in ("accuracy", "worst_group_accuracy", "equalized_odds_difference"):
                assert _finite(run[method][key]), (dataset, method, key)
            assert method in block["summary"]
            assert f"| {method} |" in table
        for method in config.FAIR_VARIANTS:
            assert _finite(run[method]["detector_tpr"]) and _finite(run[method]["detector_fpr"])
            assert 0.0 <= run[method]["tau"] <= 1.0
        assert run["FairNet-Full w/o detector"]["tau"] == 0.0
        assert run["FairNet-Partial"]["label_setting"] == "partial"
        assert run["FairNet-Unlabeled"]["label_setting"] == "unlabeled"
        assert 0 < run["FairNet-Partial"]["train_labelled_rows"] < block["runs"]["0"]["sizes"]["train"]
        assert set(block["targets"]) == {"a", "b"}
        for plot in block["plots"].values():
            assert os.path.exists(plot if os.path.isabs(plot) else os.path.join(ROOT, plot))
    assert "Target (a)" in table and "Target (b)" in table
    # the Markdown file got the generated block under the quality heading, and a rerun replaces it in place
    doc = out / "benchmarks.md"
    text = doc.read_text()
    block = report.QUALITY_BLOCK
    assert text.startswith("# Benchmarks") and block.heading in text and block.begin in text
    report.write_block(str(doc), block, "second body\n")
    again = doc.read_text()
    assert again.count(block.begin) == 1 and "second body" in again and "| ERM |" not in again


def test_quality_report_from_rebuilds_the_same_table_without_training(tiny_report, tmp_path):
    quality, out, _ = tiny_report
    again = tmp_path / "again"
    quality.main(["--tiny", "--report-from", str(out / "results.json"), "--out", str(again), "--doc", "none"])
    def without_plot_lines(path):  # the plots are written to the new folder
        return [line for line in path.read_text().splitlines() if not line.startswith("Plots: ")]

    assert without_plot_lines(again / "table.md") == without_plot_lines(out / "table.md")
    assert json.loads((again / "results.json").read_text())["command"].startswith("python benchmarks/quality.py --tiny")
    assert (again / "text_group_accuracies.png").exists() and (again / "vision_tau_sweep.png").exists()


def test_write_block_keeps_other_sections(tmp_path):
    block = report.QUALITY_BLOCK
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## Inference overhead\n\nnumbers\n\n## Quality (issue 6)\n\nhand text\n\n"
                   "## Later\n\nkeep\n")
    report.write_block(str(doc), block, "table v1")
    report.write_block(str(doc), block, "table v2")
    text = doc.read_text()
    assert "## Inference overhead\n\nnumbers" in text and "hand text" in text and "## Later\n\nkeep" in text
    assert "table v2" in text and "table v1" not in text and text.count(block.begin) == 1
    assert text.index("hand text") < text.index("table v2") < text.index("## Later")
    # the one writer serves every suite: the defaults block gets its own section after the title, both stay
    report.write_block(str(doc), report.DEFAULTS_BLOCK, "defaults v1")
    report.write_block(str(doc), report.DEFAULTS_BLOCK, "defaults v2")
    text = doc.read_text()
    assert text.index(report.DEFAULTS_BLOCK.heading) < text.index("## Inference overhead") and "table v2" in text
    assert "defaults v2" in text and "defaults v1" not in text and text.count(report.DEFAULTS_BLOCK.begin) == 1


def test_quality_grid_tau_candidates_and_ceiling():
    grid = [{"class_balanced_anchors": True}, {"class_balanced_anchors": True, "pseudo_labeler": "error_set"}]
    # pseudo_labeler only changes the unlabeled setting: other settings train the point once
    assert selection.setting_grid(grid, "full") == [{"class_balanced_anchors": True}]
    assert selection.setting_grid(grid, "unlabeled") == grid
    with pytest.raises(ValueError, match="not in"):
        selection.setting_grid([{"lr": 1.0}], "full")
    # τ candidates: the fixed grid plus validation-risk quantiles, so a narrow risk band still gets graded gate rates
    risk = np.random.default_rng(0).uniform(0.45, 0.55, 1000)
    taus = selection.tau_candidates(risk)
    assert set(config.TAU_GRID) <= set(taus) and list(taus) == sorted(taus)
    rates = sorted({round(float((risk > t).mean()), 2) for t in taus})
    assert 0.0 in rates and 1.0 in rates and len([r for r in rates if 0.0 < r < 1.0]) >= 15
    # the ceiling line: ERM's worst majority cell, compared with the best baseline
    cell = lambda a: {"accuracy": a, "count": 10}  # noqa: E731
    res = lambda acc, wga, cells: {"accuracy": acc, "worst_group_accuracy": wga, "group_accuracies": cells}  # noqa: E731
    erm = res(0.8, 0.4, {"y=0,s=0": cell(0.9), "y=1,s=0": cell(0.6), "y=0,s=1": cell(0.95), "y=1,s=1": cell(0.4)})
    runs = {"0": {"results": {"ERM": erm, "GroupDRO": res(0.7, 0.7, {}), "FairNet-Full": res(0.8, 0.55, {}),
                              "FairNet-Unlabeled": res(0.8, 0.45, {})}}}
    tg = report.targets(report.summarise(runs))
    assert tg["a"]["erm_majority_worst_cell"] == pytest.approx(0.6)
    text = report.render_targets(tg)
    assert "worst majority-group (s=0) cell is 60.0" in text and "70.0 is out of reach by design" in text
    assert "Target (a): NOT MET" in text and "Target (b): MET" in text


@pytest.mark.slow
def test_quality_jobs_runs_each_dataset_in_a_child_and_merges(tmp_path):
    argv = ["--tiny", "--jobs=2", "--datasets", "text,vision", "--out", "x", "--doc=none", "--seeds", "1"]
    overrides = {"--datasets": "text", "--out": "o/part-text", "--doc": "none", "--jobs": 1}
    assert orchestration.child_argv(argv, overrides) == [
        "--tiny", "--seeds", "1", "--datasets", "text", "--out", "o/part-text", "--doc", "none", "--jobs", "1"]
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "quality.py"), "--tiny", "--jobs", "2", "--threads", "1",
                           "--methods", "ERM,FairNet-Full", "--out", str(out), "--doc", "none"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0] and "--jobs 2" in saved["command"]
    for dataset in ("text", "vision"):
        run = saved["datasets"][dataset]["runs"]["0"]["results"]
        assert set(run) >= {"ERM", "FairNet-Full"} and _finite(run["FairNet-Full"]["worst_group_accuracy"])
        assert (out / f"{dataset}_group_accuracies.png").exists() and not (out / f"part-{dataset}").exists()
    assert "| FairNet-Full |" in (out / "table.md").read_text()


def test_selector_floor_is_reference_accuracy_minus_half_a_point():
    sel = selection.Selector("worst_group_accuracy", 0.870)
    state = iter(range(10))
    sel.offer({"epoch": 1, "accuracy": 0.830, "worst_group_accuracy": 0.70}, lambda: next(state))
    assert sel.best["epoch"] == 1  # below the floor, but the only candidate
    sel.offer({"epoch": 2, "accuracy": 0.865, "worst_group_accuracy": 0.69}, lambda: next(state))
    assert sel.best["epoch"] == 2  # 0.865 = 0.870 - 0.005 meets the floor and beats a higher WGA below it
    sel.offer({"epoch": 3, "accuracy": 0.860, "worst_group_accuracy": 0.90}, lambda: next(state))
    sel.offer({"epoch": 4, "accuracy": 0.880, "worst_group_accuracy": 0.69}, lambda: next(state))
    assert sel.best["epoch"] == 4 and sel.state == 2  # same WGA: the higher accuracy wins; its own state is kept
    sel.offer({"epoch": 5, "accuracy": 0.880, "worst_group_accuracy": 0.69}, lambda: next(state))
    assert sel.best["epoch"] == 4  # a tie keeps the earlier candidate
    assert [c["epoch"] for c in sel.history] == [1, 2, 3, 4, 5]


def test_baselines_units():
    # JTT: error set and weights
    errors = baselines.jtt_error_set(np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([0, 0, 1]))
    assert errors.tolist() == [False, True, True]
    assert baselines.jtt_weights(errors, 6).tolist() == [1.0, 6.0, 6.0]
    # DFR recovers a separable rule from balanced validation features
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = rng.integers(0, 2, 400)
    x = np.c_[y * 2.0 - 1 + 0.3 * rng.standard_normal(400), s + 0.1 * rng.standard_normal(400)]
    head = baselines.dfr_fit(x, y, s, seed=0, n_draws_tune=2, n_draws_final=3)
    assert (head.predict(x) == y).mean() > 0.95 and head.info["C"] in baselines.DFR_C_GRID


def test_groupdro_upweights_the_worst_cell(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    class Tiny(torch.nn.Module):
        """Predicts class 1 when x0 > 0, the majority's rule; the minority's labels follow the opposite rule."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            with torch.no_grad():
                self.lin.weight.copy_(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]))
                self.lin.bias.zero_()

        def forward(self, x=None, **kwargs):
            return type("Out", (), {"logits": self.lin(x)})()

    n = 64
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    sensitive = (np.arange(n) % 8 == 0).astype(int)
    labels = (x[:, 0] > 0).astype(int)
    labels[sensitive == 1] = 1 - labels[sensitive == 1]  # the minority cells are the ones the model gets wrong
    data = Dataset.from_dict({"x": x.tolist(), "labels": labels, "sensitive": sensitive})

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows]), "labels": torch.tensor([r["labels"] for r in rows]),
                "sensitive": torch.tensor([r["sensitive"] for r in rows])}

    model = Tiny()
    with torch.no_grad():  # per-cell loss of the initial model; cells are y * 2 + s
        per_row = torch.nn.functional.cross_entropy(model(torch.tensor(x)).logits, torch.tensor(labels),
                                                    reduction="none").numpy()
    cells = labels * 2 + sensitive
    cell_loss = np.array([per_row[cells == c].mean() for c in range(4)])
    worst = int(cell_loss.argmax())
    assert sensitive[cells == worst].all() and cell_loss[worst] > 2 * cell_loss[[0, 2]].max()  # the set-up holds

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=1,
                             learning_rate=1e-4, report_to="none", save_strategy="no", remove_unused_columns=False,
                             use_cpu=True, disable_tqdm=True)
    trainer = baselines.GroupDROTrainer(model=model, args=args, train_dataset=data, data_collator=collate, eta=0.1)
    trainer.train()
    q = trainer.q
    assert q.shape == (4,) and abs(float(q.sum()) - 1.0) < 1e-5
    # the worst cell holds the largest weight and went up from the uniform 1/4; the majority cells went down
    assert int(q.argmax()) == worst and float(q[worst]) > 0.25, (q, cell_loss)
    assert float(q[[0, 2]].max()) < 0.25 < float(q[[1, 3]].min()), (q, cell_loss)
    assert float(q[worst]) > 1.3 * float(q[[0, 2]].max()), q


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.slow
def test_gpu_run_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    command = ["bash", os.path.join(BENCH, "gpu_run.sh"), "--dry-run", "--bf16", "--fsdp", "--out", str(out)]
    proc = subprocess.Popen(command, cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole script: no orphaned benchmark processes
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert json.loads((out / "cuda_check.json").read_text())["dry_run"] is True
    quality = json.loads((out / "quality" / "results.json").read_text())
    assert set(quality["datasets"]) == {"text", "vision"}
    steps = [s["step"] for s in summary["steps"]]
    assert steps.index("defaults") < steps.index("quality") and summary["all_ok"], summary["steps"]
    defaults = json.loads((out / "defaults" / "results.json").read_text())  # library defaults, tiny preset
    assert defaults["preset"] == "tiny" and set(defaults["settings"]) == {"full", "partial", "unlabeled"}
    assert set(defaults["tasks"]) == {"synthetic"} and "runs" in defaults["tasks"]["synthetic"]
    assert "defaults GPU run would be: standard preset" in stdout  # the GPU flags parse in defaults.py
    assert "bf16 step would run:" in stdout and "fsdp step would run:" in stdout  # issue 14's flags, dry
    assert {"bf16", "fsdp"} <= set(steps)
    overhead = [p for p in ("overhead.json", "overhead_gpu.json") if (out / p).exists()]
    assert overhead or "overhead skipped" in stdout
