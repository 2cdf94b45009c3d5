"""benchmarks/quality.py and benchmarks/gpu_run.sh run end to end at tiny size (no assertions on quality), and the
suite's pure pieces on hand-made numbers.

`quality.py --tiny` runs in-process on the text and hidden datasets: every headline row (ERM, FairNet at the library
defaults in three settings, the oracle row, GroupDRO/JTT/DFR/AFR and their ACC-floor rows) and every ablation row
must be in the JSON and the Markdown table, with finite numbers, the "dominated by" column and the checks. Hand-made
inputs check AFR's weights and last-layer fit, the ACC-floor rule, the dominance rule, the checks, that FairNet rows
get FairTrainingArguments at their defaults, and that the suite's modules import each other without a cycle.
`gpu_run.sh --dry-run` runs the whole GPU script on the CPU at tiny size and must leave its JSON files behind.
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

from fairnet_peft import metrics as M  # noqa: E402
from suite import baselines, config, orchestration, replay, report, selection  # noqa: E402

from .helpers import TINY_RUN_FILTERS  # noqa: E402

# tiny sizes trigger FairTrainer's small-data diagnostics by design (asserted in test_selection.py and
# test_trainer_defaults.py); here they are expected, not news
pytestmark = [pytest.mark.filterwarnings(f) for f in TINY_RUN_FILTERS]


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
    result = quality.main(["--tiny", "--threads", "1", "--datasets", "text,hidden", "--out", str(out),
                           "--doc", str(out / "benchmarks.md")])
    assert torch.get_num_threads() == threads
    return quality, out, result


def test_quality_tiny_has_every_row_and_finite_numbers(tiny_report):
    quality, out, _ = tiny_report
    saved = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert saved["command"].startswith("python benchmarks/quality.py --tiny")
    assert set(saved["datasets"]) == {"text", "hidden"}
    for dataset in ("text", "hidden"):
        block = saved["datasets"][dataset]
        run = block["runs"]["0"]["results"]
        for row in config.HEADLINE_ROWS + config.ABLATION_ROWS:
            assert row in run, (dataset, row)
            for key in ("accuracy", "worst_group_accuracy", "equalized_odds_difference"):
                assert _finite(run[row][key]), (dataset, row, key)
            assert row in block["summary"] and f"| {row} |" in table
        for row in config.FLOOR_BASELINES:  # every baseline has its ACC-floor row, which says whether the floor held
            assert isinstance(run[config.floor_row(row)]["floor_met"], bool)
        for row, setting in config.FAIRNET_DEFAULTS.items():  # the library defaults, as the trainer hands them back
            res = run[row]
            assert res["label_setting"] == setting and 0.0 <= res["tau"] <= 1.0
            assert 0.0 <= res["detector_tpr"] <= 1.0 and 0.0 <= res["detector_fpr"] <= 1.0
            # its selection passes are saved, and benchmarks/reselect.py's replay hands back the same model
            assert ("passes" in res) != ("trainer_error" in res), (dataset, row, res.get("trainer_error"))
            if "trainer_error" in res:  # the trainer refused (the user keeps ERM): nothing was selected
                continue
            assert res["passes"] == str(out / "passes" / f"{dataset}-s0-{setting}.npz")
            data = replay.load(res["passes"])
            again = replay.replay(data)
            assert again["threshold"] == pytest.approx(res["tau"])
            assert M.accuracy(data["test_labels"], again["test_pred"]) == pytest.approx(res["accuracy"])
        assert run["FairNet-Partial"]["train_labelled_rows"] < block["runs"]["0"]["sizes"]["train"]
        assert run["FairNet-Unlabeled"]["train_labelled_rows"] == 0
        assert len(run["FairNet-Full"]["sweep"]) == len(config.TAU_GRID)
        assert run["FairNet-Full (grid) w/o detector"]["tau"] == 0.0
        afr = run["AFR"]["afr"]
        assert afr["held_out_rows"] + afr["erm_rows"] == block["runs"]["0"]["sizes"]["train"]
        assert {"gamma", "lam"} <= set(run["AFR"]["selected"])
        assert "worst_group_accuracy" not in run["AFR"]["selected"]  # label-free: selected without validation groups
        assert {"not_dominated", "floor_wga", "unlabeled_vs_afr", "oracle_share"} <= set(block["targets"])
        for plot in block["plots"].values():
            assert os.path.exists(plot if os.path.isabs(plot) else os.path.join(ROOT, plot))
    assert "no_harm" in saved["datasets"]["hidden"]["targets"] and "no_harm" not in saved["datasets"]["text"]["targets"]
    assert "| text: method | train s | val s | selection | ACC | WGA | EOD ↓ | dominated by |" in table
    assert table.count("| hidden: ablation |") == 1 and "Checks (means over seeds):" in table
    assert "Run: " in table and "CPU (" in table  # the machine line
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
    assert (again / "text_group_accuracies.png").exists() and (again / "hidden_tau_sweep.png").exists()


def test_write_block_keeps_other_sections(tmp_path):
    block = report.QUALITY_BLOCK
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## Inference overhead\n\nnumbers\n\n## Quality suite\n\nhand text\n\n"
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


def test_quality_grid_and_tau_candidates():
    grid = [{"anchor_weighting": "class_balanced"}, {"anchor_weighting": "class_balanced", "pseudo_labeler": "error_set"}]
    # pseudo_labeler only changes the unlabeled setting: other settings train the point once
    assert selection.setting_grid(grid, "full") == [{"anchor_weighting": "class_balanced"}]
    assert selection.setting_grid(grid, "unlabeled") == grid
    with pytest.raises(ValueError, match="not in"):
        selection.setting_grid([{"lr": 1.0}], "full")
    # τ candidates: the fixed grid plus validation-risk quantiles, so a narrow risk band still gets graded gate rates
    risk = np.random.default_rng(0).uniform(0.45, 0.55, 1000)
    taus = selection.tau_candidates(risk)
    assert set(config.TAU_GRID) <= set(taus) and list(taus) == sorted(taus)
    rates = sorted({round(float((risk > t).mean()), 2) for t in taus})
    assert 0.0 in rates and 1.0 in rates and len([r for r in rates if 0.0 < r < 1.0]) >= 15


def _summary(rows: dict) -> dict:
    """A quality summary from {row: (acc, wga)} seed means."""
    return {r: {"accuracy": {"mean": a, "low": None, "n": 1}, "worst_group_accuracy": {"mean": w, "low": None, "n": 1}}
            for r, (a, w) in rows.items()}


def test_dominated_by_on_a_hand_made_table():
    summary = _summary({"ERM": (0.80, 0.40), "FairNet-Full": (0.81, 0.60), "GroupDRO": (0.78, 0.70),
                        "DFR": (0.82, 0.65), "JTT": (0.82, 0.60), config.ORACLE_ROW: (0.90, 0.90)})
    dom = report.dominated_by(summary, list(summary))
    assert dom["ERM"] == ["FairNet-Full", "DFR", "JTT"]  # the oracle row never dominates
    assert dom["FairNet-Full"] == ["DFR"]  # JTT ties on WGA: a tie is not domination
    assert dom["GroupDRO"] == [] and dom["DFR"] == [] and dom["JTT"] == [] and dom[config.ORACLE_ROW] == []
    table = report.render_headline("t", summary)
    assert "| FairNet-Full | all | all (half trains the LoRA) | library defaults | 81.0 | 60.0 | – | DFR |" in table


def test_competitiveness_checks_on_hand_made_numbers():
    fl = config.floor_row
    summary = _summary({"ERM": (0.80, 0.40), "FairNet-Full": (0.81, 0.60), "FairNet-Unlabeled": (0.80, 0.45),
                        config.ORACLE_ROW: (0.83, 0.70), "GroupDRO": (0.79, 0.70), fl("GroupDRO"): (0.80, 0.55),
                        "AFR": (0.70, 0.66), fl("AFR"): (0.80, 0.62), "DFR": (0.82, 0.61)})
    tg = report.targets(summary)
    assert not tg["not_dominated"]["met"] and tg["not_dominated"]["by"] == ["DFR"]
    assert not tg["floor_wga"]["met"] and tg["floor_wga"]["above"] == [fl("AFR")]  # 62 > 60; 55 is not
    assert tg["floor_wga"]["beyond_budget"] == []
    beyond = dict(summary, **{fl("GroupDRO"): _summary({"x": (0.79, 0.90)})["x"]})  # no candidate met the floor
    tg2 = report.targets(beyond)
    assert tg2["floor_wga"]["above"] == [fl("AFR")] and tg2["floor_wga"]["beyond_budget"] == [fl("GroupDRO")]
    assert "not compared: GroupDRO (ACC floor) 79.0 ACC" in tg2["floor_wga"]["text"]
    below = dict(beyond, **{fl("AFR"): _summary({"x": (0.70, 0.90)})["x"]})  # no floor row at the budget at all
    tg3 = report.targets(below)
    assert tg3["floor_wga"]["applies"] is False and tg3["floor_wga"]["met"] is None
    assert tg3["floor_wga"]["text"].startswith("FairNet-Full vs the ACC-floor rows: n/a (no baseline stays")
    assert tg["unlabeled_vs_afr"]["applies"] is False  # AFR's ACC 70 < ERM − 0.5: the check does not apply
    assert tg["oracle_share"]["met"] is False  # gain 20 < 0.8 × 30
    summary["AFR"] = _summary({"AFR": (0.799, 0.44)})["AFR"]
    summary["FairNet-Full"] = _summary({"x": (0.81, 0.64)})["x"]
    summary["DFR"] = _summary({"x": (0.80, 0.61)})["x"]
    tg = report.targets(summary, "hidden")
    assert tg["not_dominated"]["met"] and tg["floor_wga"]["met"] and tg["oracle_share"]["met"]  # 24 ≥ 0.8 × 30
    assert tg["unlabeled_vs_afr"]["applies"] and tg["unlabeled_vs_afr"]["met"]  # 45 ≥ 44, ACC 80 ≥ 79.5
    assert tg["no_harm"]["met"]
    assert "**NOT MET**" not in report.render_targets(tg) and report.render_targets(tg).count("**MET**") == 5


def test_floor_rule_picks_the_right_candidate():
    cands = [{"accuracy": 0.790, "worst_group_accuracy": 0.90},  # misses the floor 0.80 − 0.005
             {"accuracy": 0.800, "worst_group_accuracy": 0.50},
             {"accuracy": 0.796, "worst_group_accuracy": 0.60},  # meets it, best WGA among those that do
             {"accuracy": 0.850, "worst_group_accuracy": 0.55}]
    assert selection.pick_under_floor(cands, 0.80) == 2
    # none meets the floor: the floor row takes the most accurate candidate, the method's own rule the best WGA
    low = [{"accuracy": 0.70, "worst_group_accuracy": 0.90}, {"accuracy": 0.75, "worst_group_accuracy": 0.10}]
    assert selection.pick_under_floor(low, 0.80) == 1
    own = selection.Selector("worst_group_accuracy", 0.80)
    for i, c in enumerate(low):
        own.offer(c, lambda i=i: i)
    assert own.state == 0 and own.floor_met is False
    sel = selection.floor_selector(0.80)
    for i, c in enumerate(cands):
        sel.offer(c, lambda i=i: i)
    assert sel.state == 2 and sel.floor_met is True


def test_dfr_floor_row_keeps_a_C_that_meets_the_floor():
    rng = np.random.default_rng(1)
    n = 400
    y, s = rng.integers(0, 2, n), (rng.random(n) < 0.3).astype(int)
    x = np.c_[y * 2.0 - 1 + 0.8 * rng.standard_normal(n), (s - 0.5) * (2 * y - 1) + 0.5 * rng.standard_normal(n)]
    perfect = baselines.dfr_fit(x, y, s, seed=0, n_draws_tune=2, n_draws_final=2, reference_pred=y)
    floor, accs = perfect.info["acc_floor"], perfect.info["tuning_acc_by_C"]
    assert floor == pytest.approx(1.0 - 0.005) and not perfect.info["floor_met"]
    assert accs[str(perfect.info["C"])] == max(accs.values())  # no C is that accurate: the most accurate one
    easy = baselines.dfr_fit(x, y, s, seed=0, n_draws_tune=2, n_draws_final=2, reference_pred=1 - y)
    assert easy.info["floor_met"] and easy.info["acc_floor"] < 0.0  # every C meets a floor below 0 ...
    wgas = easy.info["tuning_wga_by_C"]
    assert wgas[str(easy.info["C"])] == max(wgas.values())  # ... so the floor row keeps the best WGA


def test_afr_weights_follow_the_formula():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, -1.0]])
    labels = np.array([0, 0, 1, 1])
    p = np.array([np.exp(2) / (np.exp(2) + 1), 1 / (1 + np.exp(2)), 0.5, np.exp(-1) / (np.exp(3) + np.exp(-1))])
    for gamma in (0.0, 1.0, 4.0, 30.0):
        w = baselines.afr_weights(logits, labels, gamma)
        expected = np.exp(-gamma * p) / np.exp(-gamma * p).sum()
        assert w == pytest.approx(expected, rel=1e-9) and w.sum() == pytest.approx(1.0)
    assert baselines.afr_weights(logits, labels, 0.0) == pytest.approx(np.full(4, 0.25))
    w = baselines.afr_weights(logits, labels, 4.0)
    assert list(np.argsort(w)) == list(np.argsort(-p))  # the less ERM believes the true class, the more weight
    with pytest.raises(ValueError, match="gamma"):
        baselines.afr_weights(logits, labels, -1.0)


def test_afr_fit_follows_the_weights_and_the_pull():
    x = np.array([[1.0, 0.0], [1.0, 0.0]])  # the same input with both labels: the weights decide
    y = np.array([0, 1])
    w0, b0 = np.zeros((2, 2)), np.zeros(2)
    assert baselines.afr_fit(x, y, np.array([0.9, 0.1]), w0, b0, lam=0.01).predict(x[:1])[0] == 0
    assert baselines.afr_fit(x, y, np.array([0.1, 0.9]), w0, b0, lam=0.01).predict(x[:1])[0] == 1
    # λ pulls toward ERM's head: a strong pull keeps it, no pull moves it
    start = np.array([[0.5, -0.2], [-0.5, 0.2]])
    held = baselines.afr_fit(x, y, np.array([0.1, 0.9]), start, np.zeros(2), lam=1e6)
    free = baselines.afr_fit(x, y, np.array([0.1, 0.9]), start, np.zeros(2), lam=0.0)
    assert np.abs(held.weight - start).max() < 1e-4 and np.abs(free.weight - start).max() > 0.1
    # the optimum of Σ w·CE + λ||θ − θ0||²: for one input x, softmax(logits)[1] = 0.9 when λ = 0
    logit = free.logits(x[:1])[0]
    assert np.exp(logit[1]) / np.exp(logit).sum() == pytest.approx(0.9, abs=1e-3)


def test_afr_split_is_stratified_on_the_class_label_only():
    from suite.methods import afr_split

    labels = np.array([0] * 80 + [1] * 20)
    fit, held = afr_split(labels, 0.2, seed=0)
    assert len(fit) == 80 and len(held) == 20 and not set(fit) & set(held)
    assert labels[held].sum() == 4  # the class balance is kept in the held-out rows
    assert np.array_equal(fit, afr_split(labels, 0.2, seed=0)[0])


def test_fairnet_rows_get_the_default_arguments(monkeypatch, tmp_path):
    """`train_at_defaults` (both suites) sets only output dir, epochs, batch sizes, seed, logging and the data
    plumbing it is given, and `train_lora_when_blind` (a LoRA trained for the suites' oracle and replays where the
    adapter stays off anyway): every other FairTrainingArguments field is the library default."""
    import fairnet_peft
    from peft import PeftModel

    from suite import fairnet

    seen = {}

    class Recorder:
        def __init__(self, model, args, **kwargs):
            assert isinstance(model, PeftModel)
            seen["args"], seen["kwargs"] = args, kwargs

        def remove_callback(self, cb):
            pass

        def train(self):
            return type("Out", (), {"metrics": {}})()

    monkeypatch.setattr(fairnet_peft, "FairTrainer", Recorder)
    import transformers as T

    erm = T.BertForSequenceClassification(T.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=8))
    fairnet.train_at_defaults(erm, "train-ds", "eval-ds", {"task_type": "SEQ_CLS"}, str(tmp_path), 3, 2.0, 8, 16,
                              "collate", remove_unused_columns=False)
    args = seen["args"]  # the default to compare with runs on the same device (use_cpu sets derived fields)
    default = fairnet_peft.FairTrainingArguments(output_dir=str(tmp_path), use_cpu=args.use_cpu)
    allowed = {"output_dir", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "seed",
               "report_to", "save_strategy", "logging_strategy", "disable_tqdm", "dataloader_num_workers", "use_cpu",
               "remove_unused_columns", "logging_dir", "train_lora_when_blind"}
    import dataclasses

    changed = {f.name for f in dataclasses.fields(default)
               if f.name not in allowed and getattr(args, f.name) != getattr(default, f.name)}
    assert not changed, changed
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.seed) == (2.0, 8, 3)
    assert args.train_lora_when_blind and not default.train_lora_when_blind
    assert seen["kwargs"]["eval_dataset"] == "eval-ds" and seen["kwargs"]["train_dataset"] == "train-ds"


def test_suite_modules_import_each_other_without_a_cycle():
    """Relative imports between benchmarks/suite modules, function-local ones included, form no cycle."""
    import ast

    suite_dir = os.path.join(BENCH, "suite")
    graph = {}
    for name in os.listdir(suite_dir):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(suite_dir, name), encoding="utf-8").read())
            graph[name[:-3]] = {n.module.split(".")[0] for n in ast.walk(tree)
                                if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert "methods" not in graph["data"] and "data" in graph["methods"]


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
        assert (out / "passes" / f"{dataset}-s0-full.npz").exists()  # the children save where the parent's out is
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
        stdout, stderr = proc.communicate(timeout=900)  # above the script's 720 s cap per job
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole script: no orphaned benchmark processes
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert json.loads((out / "cuda_check.json").read_text())["dry_run"] is True
    quality = json.loads((out / "quality" / "results.json").read_text())
    assert set(quality["datasets"]) == {"vision"}  # test_quality_tiny_* run text and hidden
    steps = [s["step"] for s in summary["steps"]]
    assert steps.index("defaults") < steps.index("quality") and summary["all_ok"], summary["steps"]
    defaults = json.loads((out / "defaults" / "results.json").read_text())  # library defaults, tiny preset
    assert defaults["preset"] == "tiny" and defaults["settings"] == ["partial"]  # test_defaults_bench: the others
    assert set(defaults["tasks"]) == {"synthetic"} and "runs" in defaults["tasks"]["synthetic"]
    assert "defaults GPU run would be: standard preset" in stdout  # the GPU flags parse in defaults.py
    assert "bf16 step would run:" in stdout and "fsdp step would run:" in stdout  # the bf16 and FSDP flags, dry
    assert {"bf16", "fsdp"} <= set(steps)
    overhead = [p for p in ("overhead.json", "overhead_gpu.json") if (out / p).exists()]
    assert overhead or "overhead skipped" in stdout


def test_quality_set_fair_overrides_adds_to_the_presets_own():
    quality = _load("quality")
    args = quality.parse_args(["--tiny", "--set", 'vision.fair_overrides={"lora_rows": "train"}'])
    overrides = args.config["vision"]["fair_overrides"]
    assert overrides["lora_rows"] == "train"
    assert config.TINY_FAIR_OVERRIDES.items() <= overrides.items()  # the tiny caps stay
    assert "fair_overrides" not in args.config["text"] or args.config["text"]["fair_overrides"].get("lora_rows") is None
    with pytest.raises(SystemExit):
        quality.parse_args(["--tiny", "--set", "vision.fair_overrides=3"])


def test_family_scan_passes_a_layout_that_works_and_names_one_that_does_not():
    """benchmarks/family_scan.py: BERT and ViT pass at the defaults; I-BERT (QuantLinear layers) fails with the
    library's own error; a base that gives every row the same logits is a skip, not a finding."""
    scan = _load("family_scan")
    assert scan.scan_one("bert", text=True) == ("OK", "")
    assert scan.scan_one("vit", text=False) == ("OK", "")
    status, detail = scan.scan_one("ibert", text=True)
    assert status == "FAIL" and "cannot adapt QuantLinear modules" in detail and "target_modules" in detail
    assert scan._close(torch.ones(3), torch.ones(3) * (1 + 1e-6)) and not scan._close(torch.ones(3), torch.zeros(3))
