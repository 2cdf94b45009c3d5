"""benchmarks/defaults.py (the default-settings suite) end to end at tiny size, plus its small pure pieces.

One in-process `--tiny` run (synthetic, digits and hidden, one seed, settings full and unlabeled to keep the file fast)
must write results.json, table.md and the generated doc block, with finite, consistent metrics (WGA ≤ ACC, every
bootstrap CI around its point, gate rates in [0, 1]). The label hiding (the package's `hide_group_labels`), the hidden
task's construction (its group is independent of the input), the t-interval, the goal rule and the "loader not there
yet" skip are checked on their own. No assertion on quality.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "benchmarks") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from fairnet_peft import metrics as M  # noqa: E402
from suite import config, data, report, report_defaults  # noqa: E402
from .helpers import TINY_RUN_FILTERS  # noqa: E402

# tiny sizes trigger FairTrainer's small-data diagnostics by design (asserted in test_selection.py)
pytestmark = [pytest.mark.filterwarnings(f) for f in TINY_RUN_FILTERS]


def _load():
    return _load_script("defaults")


def _load_script(script: str):
    name = f"fairnet_bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{script}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    bench = _load()
    out = tmp_path_factory.mktemp("defaults")
    doc = out / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nIntro.\n\n## Inference overhead\n\nkept\n")
    threads = torch.get_num_threads()
    result = bench.main(["--tiny", "--threads", "1", "--tasks", "synthetic,digits,hidden", "--settings",
                         "full,unlabeled", "--out", str(out), "--doc", str(doc)])
    assert torch.get_num_threads() == threads
    return bench, out, result


def _in_unit(x) -> bool:
    return x is not None and math.isfinite(x) and -1e-9 <= x <= 1 + 1e-9


def test_tiny_results_are_complete_finite_and_consistent(tiny):
    bench, out, _ = tiny
    saved = json.loads((out / "results.json").read_text())
    assert saved["command"].startswith("python benchmarks/defaults.py --tiny")
    assert set(saved["tasks"]) == {"synthetic", "digits", "hidden"} and saved["settings"] == ["full", "unlabeled"]
    assert "make_synthetic_text(group_in_input=False)" in saved["tasks"]["hidden"]["runs"]["0"]["description"]
    for task, block in saved["tasks"].items():
        run = block["runs"]["0"]
        assert set(run["settings"]) == {"full", "unlabeled"}
        for res in [run["erm"], *run["settings"].values()]:
            for key in config.METRICS:
                ci = res[key]
                assert _in_unit(ci["point"]) and ci["low"] - 1e-9 <= ci["point"] <= ci["high"] + 1e-9, (task, key, ci)
            assert res["worst_group_accuracy"]["point"] <= res["accuracy"]["point"] + 1e-9
            worst = res["worst_cell"]
            assert worst["cell"] in res["cells"] and worst["count"] == res["cells"][worst["cell"]]["count"] > 0
            assert worst["point"] == pytest.approx(res["worst_group_accuracy"]["point"])
            assert worst["minority"] == worst["cell"].endswith("s=1")
        for st, res in run["settings"].items():
            assert _in_unit(res["gate_rate_s0"]) and _in_unit(res["gate_rate_s1"])
            assert res["train_metrics"]["train_runtime"] > 0
        sel = run["settings"]["unlabeled"]["selector"]  # ρ of the label-free selectors
        assert sel["candidates"] >= 9  # ρ is nan (null in the JSON) when a side is constant over the candidates
        assert all((sel[k]["rho"] is None or -1 <= sel[k]["rho"] <= 1) and _in_unit(sel[k]["test_wga"])
                   for k in ("pseudo", "worst_class"))
        assert "selector" not in run["settings"]["full"]
        for st, row in block["summary"].items():
            for key in ("erm_accuracy", "fairnet_accuracy", "fairnet_worst_group_accuracy"):
                assert row[key]["n"] == 1 and row[key]["low"] is None  # one seed: no t-interval
            assert row["fairnet_accuracy"]["mean"] == pytest.approx(run["settings"][st]["accuracy"]["point"])
            assert isinstance(row["goal"]["text"], str) and row["goal"]["text"]


def test_tiny_table_and_doc_block(tiny):
    bench, out, _ = tiny
    table = (out / "table.md").read_text()
    assert table.startswith("Command: `python benchmarks/defaults.py --tiny")
    for task in ("synthetic", "digits", "hidden"):
        for st in ("full", "unlabeled"):
            assert f"| {task} | {st} |" in table
    # every setting selects the correction after training: each task's note gives its choice per seed
    for st in ("full", "unlabeled"):
        assert table.count(f"{st}: correction selected per seed: ") == 3
    assert table.count("unlabeled: pseudo-labeler chosen per seed ") == 3
    assert table.count("unlabeled: Spearman ρ with the true validation WGA") == 3
    assert table.count("ERM − 1 (the group is not in the input)") == 2  # hidden's no-harm goal, in both settings
    doc = (out / "benchmarks.md").read_text()
    # the section sits right after the title, before the first existing section, which is kept
    block = report.DEFAULTS_BLOCK
    assert doc.index(block.heading) < doc.index("## Inference overhead") and "kept" in doc
    assert doc.count(block.begin) == 1 and table.strip() in doc
    report.write_block(str(out / "benchmarks.md"), block, "new body\n")  # a rerun replaces only the block
    doc2 = (out / "benchmarks.md").read_text()
    assert doc2.count(block.heading) == 1 and "new body" in doc2 and "Command:" not in doc2 and "kept" in doc2


def test_label_settings_hide_group_labels_as_the_package_does():
    """The suite's label settings are `fairnet_peft.data.hide_group_labels`: partial keeps the package's
    `partial_group_labels` of the train rows and no validation group label, unlabeled none; test keeps its labels."""
    from datasets import Dataset

    from fairnet_peft.data import partial_group_labels

    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 1000), (rng.random(1000) < 0.1).astype(np.int64)
    ds = {k: Dataset.from_dict({"labels": y, "sensitive": s}).with_format("torch")
          for k in ("train", "validation", "test")}
    for setting in ("full", "partial", "unlabeled"):
        seen = data.setting_view(ds, setting, seed=3)
        train, val = (np.asarray(seen[k]["sensitive"]) for k in ("train", "validation"))
        want = {"full": s, "partial": partial_group_labels(s, 0.1, 3), "unlabeled": np.full(1000, -1)}[setting]
        assert np.array_equal(train, want), setting
        assert np.array_equal(val, s if setting == "full" else np.full(1000, -1)), setting
        assert np.array_equal(np.asarray(seen["test"]["sensitive"]), s)
        assert seen["train"].format["type"] == "torch"  # the split's format is kept
    arrays = data.setting_groups({"train": y, "validation": y}, {"train": s, "validation": s}, "partial", 3, 0.1)
    assert np.array_equal(arrays[0], partial_group_labels(s, 0.1, 3)) and (arrays[1] == -1).all()


def test_hidden_task_group_is_independent_of_the_input():
    """The hidden task's tokens come from their own random stream: the same rows whatever the minority share, with
    no group marker; the majority's label is the spurious token, the minority's mostly the core token."""
    from fairnet_peft.data import SYNTH_TOKENS, make_synthetic_text

    options = config.TASK_OPTIONS["hidden"]
    a = make_synthetic_text(seed=4, n_train=600, n_val=100, n_test=100, minority_fraction=0.1, **options)
    b = make_synthetic_text(seed=4, n_train=600, n_val=100, n_test=100, minority_fraction=0.5, **options)
    ids, s = np.asarray(a["train"]["input_ids"]), np.asarray(a["train"]["sensitive"])
    assert np.array_equal(ids, np.asarray(b["train"]["input_ids"]))  # the group share does not touch the input
    assert s.mean() == pytest.approx(0.1) and np.asarray(b["train"]["sensitive"]).mean() == pytest.approx(0.5)
    assert not np.isin(ids, SYNTH_TOKENS["marker"]).any()
    y = np.asarray(a["train"]["labels"])
    spurious = (ids == SYNTH_TOKENS["spurious"][1]).any(1).astype(int)
    core = (ids == SYNTH_TOKENS["core"][1]).any(1).astype(int)
    assert np.array_equal(y[s == 0], spurious[s == 0]) and (y[s == 1] == core[s == 1]).mean() > 0.7
    # the input alone says nothing about the group: equal token rates in both groups (up to sampling noise)
    assert abs(spurious[s == 1].mean() - spurious[s == 0].mean()) < 0.15
    # and the marker task keeps its marker (the option changes only the hidden task)
    plain = np.asarray(make_synthetic_text(seed=4, n_train=50, n_val=10, n_test=10)["train"]["input_ids"])
    assert np.isin(plain, SYNTH_TOKENS["marker"]).any(1).all()


def test_held_out_adult_race_task_groups_by_race():
    """The held-out task is Adult with race as the group: the suite's bundle carries the loader's race groups for the
    same seed and rows, not the sex ones, and the task note says it never chose a default."""
    from fairnet_peft.data import load_adult_text

    cfg = dict(config.DEFAULTS_PRESETS["quick"]["adult-race"], n_train=120, n_val=60, n_test=80)
    splits, _, task_type, _, note = data.build_task("adult-race", cfg, seed=3)
    assert task_type == "SEQ_CLS" and "sensitive_attribute='race'" in note
    ref = load_adult_text(seed=3, max_train=120, max_eval=80, sensitive_attribute="race", progress=False)
    sex = load_adult_text(seed=3, max_train=120, max_eval=80, progress=False)
    assert np.array_equal(np.asarray(splits["train"]["sensitive"]), np.asarray(ref["train"]["sensitive"]))
    assert not np.array_equal(np.asarray(splits["train"]["sensitive"]), np.asarray(sex["train"]["sensitive"]))
    assert "adult-race" in config.HELD_OUT_TASKS and "adult-race" in config.DEFAULTS_PRESETS["standard"]


def test_t_interval_contains_the_mean_and_matches_scipy():
    from scipy import stats

    vals = [0.70, 0.74, 0.69]
    ci = report_defaults.t_interval(vals + [None, float("nan")])
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(vals), scale=stats.sem(vals))
    assert ci["n"] == 3 and ci["low"] == pytest.approx(lo) and ci["high"] == pytest.approx(hi)
    assert ci["low"] < ci["mean"] < ci["high"]


def _row(erm_wga, fn_wga, erm_acc, fn_acc, minority=True, erm_eod=0.10, fn_eod=0.05, auc=0.99):
    mk = lambda v: {"mean": v}  # noqa: E731
    return {"erm_worst_group_accuracy": mk(erm_wga), "fairnet_worst_group_accuracy": mk(fn_wga),
            "erm_accuracy": mk(erm_acc), "fairnet_accuracy": mk(fn_acc), "erm_worst_is_minority": minority,
            "erm_equalized_odds_difference": mk(erm_eod), "fairnet_equalized_odds_difference": mk(fn_eod),
            "detector_auc": mk(auc)}


def test_goal_rule():
    goal = report_defaults.goal
    assert goal("synthetic", "full", _row(0.30, 0.36, 0.80, 0.796), None)["met"]
    assert not goal("synthetic", "full", _row(0.30, 0.34, 0.80, 0.80), None)["met"]  # + 4 < + 5
    assert not goal("synthetic", "full", _row(0.30, 0.40, 0.80, 0.79), None)["met"]  # − 1 ACC point
    assert not goal("adult", "full", _row(0.30, 0.40, 0.80, 0.80, fn_eod=0.115), None)["met"]  # EOD + 1.5: overshoot
    # the WGA target applies only where the detector finds the group and ERM's worst cell is a minority cell
    blind = goal("waterbirds", "full", _row(0.20, 0.20, 0.60, 0.60, auc=0.61), None)
    assert blind["met"] and blind["wga_target"] is None
    majority = goal("adult", "full", _row(0.5, 0.5, 0.8, 0.8, minority=False), None)
    assert majority["met"] and majority["wga_target"] is None
    assert not goal("adult", "full", _row(0.5, 0.5, 0.8, 0.79, minority=False), None)["met"]  # ACC still counts
    # partial and unlabeled: no WGA target, the no-loss limits hold
    assert goal("digits", "unlabeled", _row(0.50, 0.50, 0.85, 0.85), None)["met"]
    assert not goal("digits", "partial", _row(0.30, 0.58, 0.80, 0.79), None)["met"]
    # the group is not in the input: do no harm, in every setting and whichever cell is ERM's worst
    assert goal("hidden", "full", _row(0.40, 0.391, 0.85, 0.846, minority=False), None)["met"]
    assert not goal("hidden", "unlabeled", _row(0.40, 0.385, 0.85, 0.85), None)["met"]  # − 1.5 WGA
    assert not goal("hidden", "partial", _row(0.40, 0.45, 0.85, 0.84), _row(0, 0.9, 0, 0))["met"]  # − 1 ACC


def test_missing_loader_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    bench = _load()
    monkeypatch.setitem(config.TASKS, "waterbirds", ("load_not_there_yet", "vit"))
    result = bench.main(["--tiny", "--tasks", "waterbirds", "--out", str(tmp_path), "--doc", "none"])
    assert "load_not_there_yet" in result["tasks"]["waterbirds"]["skipped"]
    assert "waterbirds: skipped" in (tmp_path / "table.md").read_text() and "skipped" in capsys.readouterr().out


def test_bad_flags_name_the_flag():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--tasks", "nope"])
    with pytest.raises(ValueError, match="--jobs N"):
        bench.main(["--jobs=2"])


def test_first_seed_picks_the_seed_range():
    bench = _load()
    assert bench.parse_args(["--quick", "--seeds", "2", "--first-seed", "1"]).seed_list == [1, 2]
    assert bench.parse_args(["--quick"]).seed_list == [0, 1, 2]


def test_merge_joins_seeds_and_settings_and_recomputes_the_statistics(tiny, tmp_path):
    """Seed 0 with 'full' only + seed 1 (a relabelled copy) with both settings → one report over seeds [0, 1]."""
    bench, out, _ = tiny
    saved = json.loads((out / "results.json").read_text())
    first = json.loads(json.dumps(saved))
    for block in first["tasks"].values():
        for run in block["runs"].values():
            del run["settings"]["unlabeled"]
    first["settings"] = ["full"]
    second = json.loads(json.dumps(saved))
    for block in second["tasks"].values():
        block["runs"] = {"1": block["runs"]["0"]}
        block["runs"]["1"]["settings"]["full"]["accuracy"]["point"] -= 0.1  # seed 1 differs: a 2-seed interval
    second["seeds"] = [1]
    paths = []
    for i, part in enumerate((first, second)):
        paths.append(str(tmp_path / f"part{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(part, f)
    merged = bench.main(["--merge", *paths, "--out", str(tmp_path / "merged"), "--doc", "none"])
    assert merged["seeds"] == [0, 1] and merged["settings"] == ["full", "unlabeled"]
    assert len(merged["merged_from"]) == 2
    for task, block in merged["tasks"].items():
        assert list(block["runs"]) == ["0", "1"]
        assert set(block["runs"]["0"]["settings"]) == {"full"}
        full = block["summary"]["full"]["fairnet_accuracy"]
        original = saved["tasks"][task]["runs"]["0"]["settings"]["full"]["accuracy"]["point"]
        assert full["n"] == 2 and full["mean"] == pytest.approx(original - 0.05) and full["low"] < full["high"]
        assert block["summary"]["unlabeled"]["fairnet_accuracy"]["n"] == 1
    table = (tmp_path / "merged" / "table.md").read_text()
    assert "seeds [0, 1]" in table and "--merge" in table
    assert table.count("- `python benchmarks/defaults.py --tiny") == 2  # the merged runs' own commands


def test_merge_replaces_a_task_run_with_another_model_recipe(tiny, tmp_path):
    bench, out, _ = tiny
    saved = json.loads((out / "results.json").read_text())
    newer = json.loads(json.dumps(saved))
    del newer["tasks"]["synthetic"]
    run = newer["tasks"]["digits"]["runs"]["0"]
    run["description"] += "; pretrained backbone"
    run["erm"]["accuracy"]["point"] = 0.123
    paths = [str(out / "results.json"), str(tmp_path / "newer.json")]
    with open(paths[1], "w") as f:
        json.dump(newer, f)
    merged = bench.main(["--merge", *paths, "--out", str(tmp_path / "m"), "--doc", "none"])
    digits = merged["tasks"]["digits"]["runs"]["0"]
    assert digits["description"].endswith("pretrained backbone") and digits["erm"]["accuracy"]["point"] == 0.123
    assert merged["tasks"]["synthetic"]["runs"]["0"] == saved["tasks"]["synthetic"]["runs"]["0"]


def test_saved_passes_replay_the_runs_own_selection_and_its_variants(tiny):
    """benchmarks/reselect.py's replay on the saved passes gives the run's τ, α and test scores, for the defaults and
    for every selection variant the suite computed on the live model with FairTrainer.reselect."""
    _, out, _ = tiny
    from suite import replay

    saved = json.loads((out / "results.json").read_text())
    checked = 0
    for task, block in saved["tasks"].items():
        for setting, res in block["runs"]["0"]["settings"].items():
            path = out / "passes" / f"{task}-s0-{setting}.npz"
            assert res["passes"] == str(path) and path.exists()
            data = replay.load(str(path))
            y, s = data["test_labels"], data["test_sensitive"]
            rules = {"defaults": ({}, res, res["train_metrics"].get("train_selection_threshold", 1.0)),
                     **{name: (config.SELECTION_VARIANTS[name], v, v["threshold"])
                        for name, v in res["selection_variants"].items()}}
            for name, (overrides, expected, tau) in rules.items():
                got = replay.replay(data, overrides)
                assert got["threshold"] == pytest.approx(tau), (task, setting, name)
                assert np.mean(got["test_pred"] == y) == pytest.approx(expected["accuracy"]["point"]), (task, name)
                assert M.worst_group_accuracy(y, got["test_pred"], sensitive_features=s) == pytest.approx(
                    expected["worst_group_accuracy"]["point"]), (task, setting, name)
                checked += 1
            np.testing.assert_array_equal(data["test_erm_pred"], data["test_logits_off"].argmax(-1))  # off = ERM
    assert checked >= 6 * (1 + len(config.SELECTION_VARIANTS)) - 6  # every run, nearly every variant


def test_reselect_command_tables_every_cell_and_rule(tiny, capsys):
    _, out, _ = tiny
    reselect = _load_script("reselect")
    result = reselect.main([str(out), "--rule", 'strict:{"max_accuracy_drop": 0.0}', "--per-seed",
                            "--out", str(out / "rs")])
    assert set(result) == {(t, st) for t in ("synthetic", "digits", "hidden") for st in ("full", "unlabeled")}
    for (task, setting), by_rule in result.items():
        assert set(by_rule) == {"defaults", "strict", *config.SELECTION_VARIANTS}
        assert all(r["keeps"] <= 1 and r["seeds"] == [0] for r in by_rule.values())
        # --per-seed: each seed's choice is the replay's, with the test change the table averages
        from suite import replay
        data = replay.load(str(out / "passes" / f"{task}-s0-{setting}.npz"))
        for name in ("defaults", "strict"):
            (seed,) = by_rule[name]["per_seed"]
            got = replay.replay(data, {} if name == "defaults" else {"max_accuracy_drop": 0.0})
            assert (seed["tau"], seed["alpha"]) == (got["threshold"], got["strength"])
            assert seed["d_acc"] == pytest.approx(by_rule[name]["d_acc"]["mean"])
            if got["threshold"] < 1.0:  # a kept correction's bound cleared the rule's floor on validation
                drop = 0.005 if name == "defaults" else 0.0
                assert seed["accuracy_bound"] >= seed["accuracy_off"] - drop - 1e-9 and seed["candidates"] > 1
                held = got["selection"].get("held_back")
                assert seed["why_off"] == ("on" if held is None else f"on; held back: {reselect._limits(held)}")
            else:  # why it stayed off: the replay's refusal, or a blind detector's reason
                refused = got["selection"].get("refused")
                assert seed["why_off"] != "on" and (refused is None or refused["limits"][0] in seed["why_off"])
    assert "| val ACC off → on | floor's bound |" in capsys.readouterr().out
    assert any(r["why_off"] != "on" for rows in result.values() for r in rows["defaults"]["per_seed"])
    # the group is not in the input: off under the defaults and every rule that keeps the floor's margin, which also
    # guards the loss tie-break (at z = 0 a loss gain within the noise may break a tie: method.md §7)
    hidden = result[("hidden", "full")]
    assert all(r["off"] == 1 for name, r in hidden.items() if name != "floor at the point estimate")
    text = (out / "rs" / "reselect.md").read_text()
    assert text.startswith("Command: `python benchmarks/reselect.py") and "| hidden | full | strict |" in text
    assert "--rule 'strict:{\"max_accuracy_drop\": 0.0}'" in text  # the command as a shell would take it
    with pytest.raises(SystemExit):
        reselect.main([str(out / "nothing-here")])


def test_reselect_headline_is_the_suites_table_for_the_defaults(tiny):
    """--headline: ERM and FairNet at the selection defaults, absolute, per task × setting, with the suite's goals;
    on the run's own models the FairNet columns are the run's own FairNet scores and the goal is the suite's."""
    _, out, _ = tiny
    reselect = _load_script("reselect")
    result = reselect.main([str(out), "--only", "--headline", "--out", str(out / "hl")])
    saved = json.loads((out / "results.json").read_text())
    text = (out / "hl" / "reselect.md").read_text()
    for task, block in saved["tasks"].items():
        run = block["runs"]["0"]
        for setting, res in run["settings"].items():
            row = result[(task, setting)]["defaults"]
            for metric in ("accuracy", "worst_group_accuracy", "equalized_odds_difference"):
                assert row[f"fairnet_{metric}"]["mean"] == pytest.approx(res[metric]["point"]), (task, setting)
                assert row[f"erm_{metric}"]["mean"] == pytest.approx(run["erm"][metric]["point"]), (task, setting)
            goal_text = block["summary"][setting]["goal"]["text"]
            line = next(x for x in text.splitlines() if x.startswith(f"| {task} | {setting} | 1 | "))
            assert line.endswith(f"| {goal_text} |"), (task, setting)
            assert f"{100 * res['accuracy']['point']:.1f}" in line


def test_detector_auc_tables_both_aucs_of_every_saved_run(tiny):
    """benchmarks/detector_auc.py: one row per task × setting of the run, AUCs in [0, 1] (the hidden task's detector
    sees nothing either way); the within-class AUC of a run is the trainer's own statistic on the same rows."""
    _, out, _ = tiny
    script = _load_script("detector_auc")
    text = script.main([str(out)])
    saved = json.loads((out / "results.json").read_text())
    for task, block in saved["tasks"].items():
        for setting in block["runs"]["0"]["settings"]:
            line = next(x for x in text.splitlines() if x.startswith(f"| {task} | {setting} | 1 | "))
            across, within, alone = (float(v) for v in line.split("|")[4:7])
            assert all(0.0 <= v <= 1.0 for v in (across, within, alone)), line
    by_seed = script.main([str(out), "--rows", "validation", "--per-seed"])
    assert "| synthetic | full s0 | 1 |" in by_seed
    path = next((out / "passes").glob("synthetic-s0-full.npz"))
    got = script.aucs(str(path))
    assert got["within"] > 0.9 and abs(got["class_alone"] - 0.5) < 0.2  # the synthetic group is visible, class-free
    with pytest.raises(SystemExit):
        script.main([str(out / "nothing-here")])


def _report(erm_acc: dict, fair: dict) -> dict:
    """A minimal defaults.py results.json: task 't', setting 'full', per seed ERM ACC and FairNet ACC/WGA/EOD."""
    point = lambda v: {"point": v}  # noqa: E731
    runs = {seed: {"erm": {"accuracy": point(erm_acc[seed])},
                   "settings": {"full": {"accuracy": point(a), "worst_group_accuracy": point(w),
                                         "equalized_odds_difference": point(e)}}}
            for seed, (a, w, e) in fair.items()}
    return {"tasks": {"t": {"runs": runs}}}


def test_compare_runs_pairs_the_seeds_and_refuses_other_erm_models(tmp_path):
    compare_runs = _load_script("compare_runs")
    erm = {"0": 0.80, "1": 0.82, "2": 0.81}
    a = _report(erm, {"0": (0.80, 0.50, 0.10), "1": (0.82, 0.40, 0.20), "2": (0.81, 0.60, 0.10)})
    b = _report(erm, {"0": (0.81, 0.60, 0.05), "1": (0.83, 0.52, 0.15), "2": (0.82, 0.68, 0.04)})
    (row,) = compare_runs.compare(a, b)
    assert (row["task"], row["setting"], row["seeds"]) == ("t", "full", ["0", "1", "2"])
    wga = row["worst_group_accuracy"]
    assert wga["a"] == pytest.approx(50.0) and wga["b"] == pytest.approx(60.0)
    assert wga["diff"]["values"] == pytest.approx([10.0, 12.0, 8.0])  # paired by seed, in points
    assert wga["diff"]["low"] < 10.0 < wga["diff"]["high"]
    for name, report_ in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(report_))
    text = compare_runs.main([str(tmp_path / "a"), "--vs", str(tmp_path / "b" / "results.json"), "--names", "x,y"])
    assert "WGA x → y" in text and "| t | full | 3 | 81.0 → 82.0 | +1.0" in text
    other = _report({**erm, "1": 0.70}, {"0": (0.8, 0.5, 0.1), "1": (0.8, 0.5, 0.1), "2": (0.8, 0.5, 0.1)})
    with pytest.raises(ValueError, match="t seed 1: the runs' ERM models differ"):
        compare_runs.compare(a, other)
    with pytest.raises(SystemExit, match="no results.json"):
        compare_runs.main([str(tmp_path / "missing"), "--vs", str(tmp_path / "b")])
    # FOLDER@NAME reads a selection variant of the run (the same trained models, another selection rule)
    variant = _report(erm, {"0": (0.79, 0.45, 0.12), "1": (0.82, 0.40, 0.20), "2": (0.81, 0.60, 0.10)})
    for seed, run in b["tasks"]["t"]["runs"].items():
        run["settings"]["full"]["selection_variants"] = {"rule": variant["tasks"]["t"]["runs"][seed]["settings"]["full"]}
    (tmp_path / "b" / "results.json").write_text(json.dumps(b))
    text = compare_runs.main([f"{tmp_path / 'b'}@rule", "--vs", str(tmp_path / "b"), "--names", "rule,own", "--per-seed"])
    assert "| t | full | 3 | 80.7 → 82.0 | +1.3" in text  # seed 0 of the variant: 79 against the run's 81
    assert "| t | full | 0 | -1.0 / +nan / +nan | +1.0 / +nan / +nan |" in text  # per seed against ERM (ACC only here)
    with pytest.raises(SystemExit, match="no selection variant 'other'"):
        compare_runs.main([f"{tmp_path / 'b'}@other", "--vs", str(tmp_path / "b")])


def test_inspect_passes_reads_the_correction_per_strength(tiny, capsys):
    """benchmarks/inspect_passes.py on hand-made passes with known answers, then on the tiny run's saved ones."""
    inspect_passes = _load_script("inspect_passes")
    eye = np.eye(2, dtype=np.float32)
    # validation: rows 4-5 the minority's class 1 (the off model's worst cell), both wrong off; on, their logits move
    # by 1 and 3 toward class 1 (row 5 flips); row 6 minority class 0, right both ways, risk below τ
    labels, groups = np.array([0, 0, 1, 1, 1, 1, 0]), np.array([0, 0, 0, 0, 1, 1, 1])
    off = eye[[0, 0, 1, 1, 0, 0, 0]] * 2.0
    on = off.copy()
    on[4], on[5] = [2.0, 1.0], [2.0, 3.0]
    # test: 4 rows, the minority (rows 2-3) class 1 wrong off and right on
    t_labels, t_sens = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    t_off, t_on = eye[[0, 1, 0, 0]], eye[[0, 1, 0, 1]]
    data = {"header": {"configured_tau": 0.5}, "val_labels": labels, "val_groups": groups, "val_logits_off": off,
            "val_risk": np.array([0.1] * 4 + [0.9, 0.9, 0.1], dtype=np.float32), "test_labels": t_labels,
            "test_sensitive": t_sens, "test_logits_off": t_off}
    for a in inspect_passes.STRENGTHS:
        data[f"val_logits_on_{a:g}"], data[f"test_logits_on_{a:g}"] = on, t_on
    row = inspect_passes.inspect(data)[-1]
    assert row["val_flipped"] == 1 and row["val_rows"] == 7
    assert row["val_change"] == pytest.approx(1 / 7)
    assert row["val_broken"] == 0 and row["val_se"] > 0
    assert row["val_bound"] == pytest.approx(row["val_change"] - 2 * row["val_se"])  # the default: the margin applies
    waived = inspect_passes.inspect(data, floor_admits_harmless=True)[-1]
    assert waived["val_bound"] == row["val_change"]  # a fix alone: floor_admits_harmless waives the margin
    on2, risk2 = on.copy(), data["val_risk"].copy()
    on2[0], risk2[0] = [0.0, 2.0], 0.9  # row 0 (class 0, right off) gated and now wrong too: the 2-SE margin applies
    broken = inspect_passes.inspect({**data, "val_logits_on_1": on2, "val_risk": risk2}, floor_admits_harmless=True)[-1]
    assert broken["val_broken"] == 1 and broken["val_change"] == pytest.approx(0.0)
    assert broken["val_bound"] == pytest.approx(-2 * broken["val_se"])
    # log p(class 1) = −log(1 + exp(−(z1 − z0))): off z1 − z0 = −2, on −1 and +1
    gains = np.log1p(np.exp(2.0)) - np.log1p(np.exp(-np.array([-1.0, 1.0])))
    assert row["val_worst_cell_t"] == pytest.approx(gains.mean() / (gains.std(ddof=1) / np.sqrt(2)))
    assert row["test_d_acc"] == pytest.approx(0.25) and row["test_d_wga"] == pytest.approx(1.0)
    assert row["test_minority_class_acc"] == {0: (1.0, 1.0), 1: (0.0, 1.0)}
    # the tiny run's saved passes: one line pair per strength, and the numbers are in range
    _, out, _ = tiny
    path = sorted((out / "passes").glob("synthetic-s0-full.npz"))[0]
    rows = inspect_passes.main([str(path)])[0]
    printed = capsys.readouterr().out
    assert printed.count("  α=") == len(inspect_passes.STRENGTHS) and "test: ΔACC" in printed
    assert all(0 <= r["val_flipped"] <= r["val_rows"] and -1 <= r["test_d_acc"] <= 1 for r in rows)
