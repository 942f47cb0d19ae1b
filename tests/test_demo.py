"""The demo pipeline end to end in its quick form: every stage runs and the reports have the documented schema."""
import json
import os

import pytest

from tests.helpers import python
from utils.config import ROOT, get_config
from utils.errors import UserError

METHODS = ["independent", "L2", "BCT", "UniBCT", "NCCL", "AdvBCT", "MixBCT"]
METRICS = {"TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "top1", "TPIR@FPIR=1e-1"}


def test_quick_demo_end_to_end(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    proc = python("tools/run_demo.py", "--quick", "--out", str(out), "--data", str(data), "--bootstrap", "20",
                  timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    stages = ["data", "split", "old_model", "features", "prototypes", "denoise"]
    stages += [f"train_{m}" for m in METHODS] + ["eval_old"] + [f"eval_{m}" for m in METHODS]
    for stage in stages:
        assert report["seconds"][stage] > 0, stage
        assert f"[{stage}] done" in proc.stdout
    rows = report["rows"]
    answers = {a["candidate"]: a["answer"] for a in report["decision"]["answers"]}
    assert set(answers) >= set(METHODS) - {"independent"} and set(answers.values()) <= {"yes", "no", "undecided"}
    assert report["decision"]["recommended_path"] in (out / "results.md").read_text()
    assert report["seeds"] == 1 and report["bootstrap"]["resamples"] == 20
    assert report["profile"] == "quick"
    assert report["sizes"] == {"identities": 40, "images_per_identity": 10, "ijb_subjects": 24, "old_epochs": 2,
                               "new_epochs": 2, "old_width": 8, "new_width": 12, "lr": 0.2, "warmup_epochs": 1}
    old_self = {r["metric"]: r["value"] for r in rows if r["method"] == "old"}
    for row in rows:
        margin_keys = {"margin", "margin_ci_low", "margin_ci_high"} if row["test"] == "cross" else set()
        pair_keys = {"impostor_pairs"} if row["metric"].startswith("TAR@FAR") else set()
        assert set(row) == {"method", "test", "metric", "value", "ci_low", "ci_high"} | margin_keys | pair_keys
        assert row["metric"] in METRICS and row["test"] in ("self", "cross")
        assert 0.0 <= row["ci_low"] <= row["ci_high"] <= 1.0
        if margin_keys:   # paired over the same resamples: the difference's interval is within ±1
            assert row["margin"] == pytest.approx(row["value"] - old_self[row["metric"]])
            assert -1.0 <= row["margin_ci_low"] <= row["margin_ci_high"] <= 1.0
    seen = {(r["method"], r["test"], r["metric"]) for r in rows}
    assert {("old", "self", m) for m in METRICS} <= seen
    for method in METHODS:
        assert {(method, t, m) for t in ("self", "cross") for m in METRICS} <= seen
    table = (out / "results.md").read_text()
    assert "| MixBCT | cross |" in table and "margin TAR@FAR=1e-3 [95 %] verdict" in table and "**Smoke test**" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:
        assert os.path.isfile(out / method / "model.pt")
    cross = {r["method"]: r["value"] for r in rows if r["test"] == "cross" and r["metric"] == "TAR@FAR=1e-3"}
    best = max(METHODS[1:], key=cross.get)          # the methods, the independent model left out
    curves = json.loads((out / "backfill.json").read_text())["backfill"]
    assert [(c["query"], c["order"]) for c in curves] == [(n, o) for n in (best, "independent") for o in ("random", "norm")]
    assert report["seconds"]["backfill"] > 0 and (out / "backfill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for label in ("linear", "Procrustes", "FCT (no side information)"):      # forward compatibility: gallery transforms
        assert {(f"independent + {label}", "cross", m) for m in METRICS} <= seen
    assert set(report["transform_cost"]["seconds_per_million"]) == {"linear", "procrustes", "fct"}
    assert "per million features" in table

    # one key switch and the denoising switch, retrained and evaluated against the run above
    proc = python("tools/demo_switches.py", "--profile", "quick", "--out", str(out), "--data", str(data),
                  "--rows", "4,6,9a", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    switches = json.loads((out / "switches" / "switches.json").read_text())
    assert set(switches) == {"4", "6", "9a"} and switches["4"]["keys"] == {"l1_gradient_scale": 1}
    # row 9a: the published OPdata counts, scaled: 40 classes for 28 labels, 280 × 3,625,372 / 3,598,269 images
    assert switches["9a"]["keys"] == {"num_classes": 40, "num_image": 282}
    log = (out / "switches" / "MixBCT_switch9a" / "training.log").read_text()
    assert "num_classes = 40 but the data has 28 classes: 12 classifier centres get no label" in log
    assert {(r["test"], r["metric"]) for r in switches["6"]["rows"]} == {(t, m) for t in ("self", "cross") for m in METRICS}
    table = (out / "switches" / "switches.md").read_text()
    assert "| 4 | NCCL | `l1_gradient_scale = 1` |" in table and "| 6 | MixBCT | `denoise_credible.py --no_column_norm` |" in table


def test_demo_rejects_unknown_method(tmp_path):
    proc = python("tools/run_demo.py", "--quick", "--methods", "MixBCT,Foo", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --methods: unknown method 'Foo' (expected some of "
                                                "L2, BCT, UniBCT, NCCL, AdvBCT, MixBCT)"]


def _row(method, test, metric, value, low, high):
    return dict(method=method, test=test, metric=metric, value=value, ci_low=low, ci_high=high)


def test_seeds_combine_to_mean_interval_and_sd():
    from tools.demo.report import combine_seeds, results_table

    rows = [_row("old", "self", "TAR@FAR=1e-3", 0.40, 0.37, 0.43),
            _row("BCT", "cross", "TAR@FAR=1e-3", 0.50, 0.46, 0.52),
            _row("BCT", "cross", "TAR@FAR=1e-3", 0.60, 0.58, 0.64),
            _row("BCT", "cross", "TAR@FAR=1e-3", 0.46, 0.40, 0.50)]
    combined = combine_seeds(rows)
    assert combined[0] == rows[0]
    bct = combined[1]
    assert bct["seeds"] == 3 and bct["value"] == pytest.approx(0.52) and bct["ci_low"] == pytest.approx(0.48)
    assert bct["ci_high"] == pytest.approx(0.5533333333) and bct["sd"] == pytest.approx(0.0721110255)
    table = results_table(combined, "OPclass", seeds=3, resamples=200)
    assert "| old | self |  | 0.400 [0.370, 0.430] |" in table
    assert "| BCT | cross |  | 0.520 [0.480, 0.553] (sd 0.072) |" in table


def test_margins_average_over_seeds_and_give_verdicts():
    from tools.demo.report import combine_seeds, results_table, verdict

    def cross(value, margin, low, high, metric="TAR@FAR=1e-3"):
        return dict(_row("L2", "cross", metric, value, value - 0.02, value + 0.02),
                    margin=margin, margin_ci_low=low, margin_ci_high=high)

    combined = combine_seeds([cross(0.45, 0.05, 0.01, 0.09), cross(0.43, 0.03, -0.01, 0.07)])[0]
    assert combined["margin"] == pytest.approx(0.04) and combined["margin_ci_low"] == pytest.approx(0.0)
    assert verdict(cross(0.45, 0.05, 0.01, 0.09)) == "compatible"
    assert verdict(cross(0.35, -0.05, -0.09, -0.01)) == "not compatible"
    assert verdict(cross(0.41, 0.01, -0.02, 0.04)) == "undecided"
    assert verdict(cross(0.41, 0.01, float("nan"), float("nan"))) == "compatible (no interval)"
    table = results_table([_row("old", "self", "TAR@FAR=1e-3", 0.40, 0.37, 0.43), cross(0.45, 0.05, 0.01, 0.09),
                           cross(0.38, -0.02, -0.03, -0.01, "top1")], "OPclass")
    assert "| +0.050 [+0.010, +0.090] compatible | -0.020 [-0.030, -0.010] not compatible |" in table


def test_figures_the_impostor_pairs_cannot_carry_and_the_smoke_test_heading():
    """With 384 impostor pairs TAR@FAR=1e-4 and 1e-3 are n/m (no number, no verdict); 1e-2 is shown."""
    from tools.demo.report import results_table

    def row(method, test, metric, value, **margin):
        return dict(_row(method, test, metric, value, value - 0.02, value + 0.03), impostor_pairs=384, **margin)

    rows = [row(m, t, metric, 0.4) for m, t in (("old", "self"), ("MixBCT", "self"))
            for metric in ("TAR@FAR=1e-4", "TAR@FAR=1e-3", "TAR@FAR=1e-2")]
    rows += [row("independent", "self", "TAR@FAR=1e-3", 0.5),
             row("MixBCT", "cross", "TAR@FAR=1e-3", 0.3, margin=-0.1, margin_ci_low=-0.2, margin_ci_high=0.0)]
    table = results_table(rows, "OPclass", profile="quick")
    assert table.startswith("**Smoke test**")
    assert "| MixBCT | self | n/m | n/m | 0.400 [0.380, 0.430] |" in table
    assert "| MixBCT | cross |  | n/m |  |  |  | n/m |  |  |" in table and "| MixBCT | self |" in table
    assert "TAR@FAR=1e-3 needs at least 1,000 impostor pairs; this evaluation has 384" in table
    assert "Smoke test" not in results_table(rows, "OPclass")


def test_decision_section_answers_and_recommends():
    """yes only when both verdicts are compatible, no when one is not; the compatible method losing the least
    self-test is recommended, a transform only when no trained model is compatible, else re-enrolment (with
    the backfill fraction from which the new model may query the mixed gallery); the backfill answer and the
    measured cost of each candidate."""
    from tools.demo.report import decision_of, decision_section

    def rows(method, tar, top1, own=0.5):
        found = [_row(method, "self", "TAR@FAR=1e-3", own, own - 0.02, own + 0.02)] if " + " not in method else []
        for metric, (low, high) in (("TAR@FAR=1e-3", tar), ("top1", top1)):
            found.append(dict(_row(method, "cross", metric, 0.4, 0.38, 0.42), margin=(low + high) / 2,
                              margin_ci_low=low, margin_ci_high=high))
        return found

    def curve(query, tar):
        return {"query": query, "gallery": "old", "order": "random", "merge": "plain", "fractions": [0, 0.5, 1],
                "metrics": {"TAR@FAR=1e-3": tar, "top1": [0.9, 0.9, 0.9]},
                "old_self": {"TAR@FAR=1e-3": 0.5, "top1": 0.5}, "negative_flips": [0.2, 0.1, 0.05],
                "negative_flips_genuine": [0.02, 0.01, 0.005], "flip_far": 0.001}

    above, below, across = (0.01, 0.05), (-0.05, -0.01), (-0.01, 0.01)
    base = [_row("independent", "self", "TAR@FAR=1e-3", 0.6, 0.58, 0.62)]
    table = rows("L2", above, above, 0.45) + rows("NCCL", across, above) + rows("MixBCT", below, above) + \
        rows("BCT", above, above, 0.55) + rows("independent + linear", above, above)
    backfill = {"protocol": {"impostor_pairs": 10_000},
                "backfill": [curve("BCT", [0.45, 0.55, 0.6]), curve("MixBCT", [0.45, 0.4, 0.6])]}
    cost = {"seconds_per_million": {"linear": 0.5, "procrustes": 0.4, "fct": 2.0}, "backfill_seconds_per_million": 700}
    text = "\n".join(decision_section(base + table, backfill, cost))
    assert ("- L2: **yes** (TAR@FAR=1e-3 +0.030 [+0.010, +0.050] compatible, top1 +0.030 [+0.010, +0.050] compatible; "
            "self-test -0.150 (TAR@FAR=1e-3) against the independent model; backfill not measured; cost: re-extraction "
            "700 s per million images)") in text
    assert "- NCCL: **undecided**" in text and "- MixBCT: **no**" in text
    assert ("- BCT: **yes** (TAR@FAR=1e-3 +0.030 [+0.010, +0.050] compatible, top1 +0.030 [+0.010, +0.050] compatible; "
            "self-test -0.050 (TAR@FAR=1e-3) against the independent model; a background backfill never falls below "
            "the old system from 50 % re-extracted (random order, plain merge; negative flips there: 1:N top-1 0.100, "
            "1:1 genuine at FAR=0.001 0.010)") in text
    assert ("- independent + linear: **yes** (TAR@FAR=1e-3 +0.030 [+0.010, +0.050] compatible, top1 +0.030 "
            "[+0.010, +0.050] compatible; self-test +0.000 (TAR@FAR=1e-3) against the independent model; cost: "
            "transform 0.5 s per million features against re-extraction 700 s per million images)") in text
    assert ("Recommended path: map the stored gallery with the linear transform and search it with independent's "
            "queries. Why: the mapped gallery is compatible with independent's queries on TAR@FAR=1e-3 and top1, and "
            "independent gives up the least self-test of the compatible candidates (+0.000 against the independent "
            "model); mapping takes 0.5 s per million features against 700 s per million images for re-extraction.") \
        in text
    text = "\n".join(decision_section(base + table[:-2], backfill, cost))     # without the transform
    assert ("Recommended path: deploy BCT: its queries search the old gallery as it is; re-extract the gallery in the "
            "background (never below the old system from 50 % re-extracted). Why: its queries are compatible with "
            "the old gallery on TAR@FAR=1e-3 and top1, and BCT gives up the least self-test of the compatible "
            "candidates (-0.050 against the independent model).") in text
    text = "\n".join(decision_section(base + rows("NCCL", across, above) + rows("independent + linear", above, above),
                                      backfill, cost))
    assert "Recommended path: map the stored gallery with the linear transform and search it with independent's " \
           "queries" in text
    record = decision_of(base + rows("MixBCT", below, above), backfill)     # safe only once wholly re-extracted
    assert record["answers"][0]["backfill"]["from_fraction"] == 1.0
    assert record["recommended_path"] == "re-enrol (backfill) the gallery with the new model before its queries use it"
    backfill["backfill"][1]["metrics"]["TAR@FAR=1e-3"][1] = 0.5
    record = decision_of(base + rows("MixBCT", below, above), backfill)
    assert record["recommended_path"] == "re-extract the gallery with MixBCT and switch its queries on once 50 % of " \
                                         "the gallery is re-extracted"
    assert record["why"] == "no candidate is shown to serve the old gallery as it is, and from there on the mixed " \
                            "gallery never falls below the old system (random order, plain merge)"


def test_results_plot_fits_its_axis_to_the_figures(tmp_path, monkeypatch):
    """The left panel's y axis spans the figures and their intervals (8 % of their range added), not 0–1;
    both panels are titled and the grey band is named in the legend."""
    import matplotlib.figure

    from tools.demo.report import fitted_limits, plot_results

    assert fitted_limits([0.30, 0.50, float("nan"), 0.45]) == pytest.approx((0.284, 0.516))
    assert fitted_limits([0.999, 1.0]) == pytest.approx((0.989, 1.0)) and fitted_limits([]) == (0.0, 1.0)
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig) or
                        open(path, "wb").write(b"\x89PNG"))
    rows = [_row("old", "self", "TAR@FAR=1e-3", 0.42, 0.38, 0.47), _row("BCT", "self", "TAR@FAR=1e-3", 0.6, 0.55, 0.66),
            dict(_row("BCT", "cross", "TAR@FAR=1e-3", 0.45, 0.41, 0.5), margin=0.03, margin_ci_low=0.01,
                 margin_ci_high=0.05)]
    plot_results(rows, str(tmp_path / "results.png"))
    left, right = saved[0].axes[:2]
    assert left.get_ylim() == pytest.approx((0.38 - 0.0224, 0.66 + 0.0224))
    assert left.get_title().startswith("TAR@FAR=1e-3 of each model") and right.get_title()
    assert "its 95 % interval over subjects" in [t.get_text() for t in left.get_legend().get_texts()]


def test_paired_interval_of_two_result_files(tmp_path):
    """The margin's interval: percentiles of the per-resample differences, not of either file alone."""
    import numpy as np

    from tools.demo.report import paired_interval
    from utils.io import atomic_np_savez

    old = np.array([0.40, 0.50, 0.30, 0.45, np.nan])
    cross = old + np.array([0.02, 0.01, 0.03, 0.05, 0.1])   # a NaN resample is left out
    atomic_np_savez(str(tmp_path / "old.npz"), **{"bootstrap/TAR@FAR/1e-3": old})
    atomic_np_savez(str(tmp_path / "cross.npz"), **{"bootstrap/TAR@FAR/1e-3": cross})
    low, high = paired_interval(str(tmp_path / "cross.npz"), str(tmp_path / "old.npz"), ("TAR@FAR", "1e-3"))
    assert (low, high) == pytest.approx(tuple(np.percentile([0.02, 0.01, 0.03, 0.05], [2.5, 97.5])))
    nan = paired_interval(str(tmp_path / "cross.npz"), str(tmp_path / "old.npz"), ("top1",))
    assert all(v != v for v in nan)


DEMO_CONFIGS = ["old_softmax", "independent", "L2", "BCT", "UniBCT", "NCCL", "AdvBCT", "MixBCT"]


@pytest.mark.parametrize("name", DEMO_CONFIGS)
def test_demo_config_files_hold_the_full_profile(name):
    """The demo's config files are the full profile's keys written out: a default run passes no ``--set``."""
    from configs.demo.settings import Demo
    from tools.demo.commands import config_file

    config = get_config(os.path.join(ROOT, config_file(name)))
    assert Demo().overrides(name, config) == []
    quick = {"old_softmax": [], "UniBCT": ["num_epoch=2", "refine_epochs=(1,)", "lr_steps=(1, 2)"]}
    assert Demo(profile="quick").overrides(name, config) == quick.get(name, ["num_epoch=2"])


def test_seed_index_names_the_run_and_sets_the_seed(tmp_path):
    """The k-th seed (``--seeds``) gives the model its own seed and folder, passed with ``--set``; NCCL's
    queue keeps the published fraction of the training set, at least one batch."""
    from configs.demo.settings import Demo
    from tools.demo.commands import train_command

    command = train_command(Demo(out=str(tmp_path)).seeded(2), "NCCL")
    assert command[:3] == [os.path.join("BCT_methods", "NCCL", "train.py"),
                           os.path.join("BCT_methods", "NCCL", "configs", "demo_NCCL.py"), "--set"]
    config = get_config(os.path.join(ROOT, command[1]), command[3:])
    assert (config.seed, config.output, config.queue_size) == (668, str(tmp_path / "NCCL_seed2"), 64)
    assert config.old_embedding == str(tmp_path / "feature_save" / "OPclass" / "f128_r18_softmax_class70_feature.npy")
    config = get_config(os.path.join(ROOT, command[1]), train_command(Demo(out=str(tmp_path)), "NCCL")[3:])
    assert (config.seed, config.output) == (666, str(tmp_path / "NCCL"))


def test_size_options_override_the_profile(tmp_path):
    """``--identities`` … ``--warmup_epochs`` reach every config as ``--set`` values; a bad value is refused
    with the option's name."""
    from configs.demo.settings import Demo
    from tools.demo.commands import train_command

    demo = Demo(out=str(tmp_path), identities=800, new_epochs=12, new_width=16, lr=0.3, warmup_epochs=0)
    new = get_config(os.path.join(ROOT, "BCT_methods/MixBCT/configs/demo_MixBCT.py"), train_command(demo, "MixBCT")[3:])
    old = get_config(os.path.join(ROOT, "configs/demo/old_softmax.py"), train_command(demo, "old_softmax")[3:])
    assert (demo.IDENTITIES, demo.IMAGES_PER_IDENTITY, demo.IJB_SUBJECTS, demo.OLD_EPOCHS) == (800, 8, 3200, 2)
    assert (new.num_epoch, old.network_width, new.network_width, new.lr, new.warmup_epoch, old.lr) == \
        (12, 8, 16, 0.3, 0, 0.3)
    for option, value, expected in (("ijb_subjects", 0, "a positive whole number"), ("lr", -1, "a positive number"),
                                    ("warmup_epochs", 1.5, "a whole number of 0 or more")):
        with pytest.raises(UserError, match=f"^--{option} {value!r}: expected {expected}$"):
            Demo(**{option: value})
    with pytest.raises(UserError, match="^profile 'huge': expected one of full, quick$"):
        Demo("huge")
    proc = python("tools/run_demo.py", "--warmup_epochs", "-1", "--out", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --warmup_epochs -1: expected a whole number of 0 or more"


def test_demo_refuses_reused_data_of_another_size(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.idx", "property"):
        (data / name).write_text("40,112,112\n")
    (data / "IJBC" / "meta").mkdir(parents=True)
    proc = python("tools/run_demo.py", "--quick", "--reuse", "--identities", "60", "--out", str(tmp_path / "out"),
                  "--data", str(data))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {data}: holds 40 training identities, expected 60 "
                                                "(--reuse with other sizes: pass another --data)"]


def test_curves_grid_and_table():
    from tools.demo_curves import curves_table, grid

    assert grid([200, 400, 800], [3, 6, 12], 400, 6) == [(200, 6), (400, 6), (800, 6), (400, 3), (400, 12)]
    points = [{"identities": 400, "new_epochs": 6,
               "rows": [_row("old", "self", "TAR@FAR=1e-3", 0.4, 0.37, 0.43),
                        _row("MixBCT", "cross", "TAR@FAR=1e-3", 0.5, 0.46, 0.56)]}]
    table = curves_table(points)
    assert "| identities | new-model epochs | test | old | MixBCT |" in table
    assert "| 400 | 6 | self | 0.400 [0.370, 0.430] |  |" in table and "| 400 | 6 | cross |  | 0.500 [0.460, 0.560] |" in table


def test_curves_reject_bad_lists(tmp_path):
    proc = python("tools/demo_curves.py", "--identities", "200,x", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --identities '200,x': expected comma-separated whole numbers"]


def test_idle_work_runs_while_the_last_stage_trains(tmp_path):
    """``Pipeline.parallel(idle_work=…)``: once nothing waits and a job slot is free, the idle work
    runs with the finished stages and the free threads, while the other stage still runs."""
    from tools.demo.runner import Pipeline

    pipe = Pipeline(str(tmp_path), dict(os.environ), reuse=False)
    calls = []

    def idle(finished, threads):
        calls.append((sorted(finished), threads, "slow" in pipe.seconds))
        return len(calls) == 1

    stages = [("quick", ["-c", "pass"], []), ("slow", ["-c", "import time; time.sleep(3)"], [])]
    pipe.parallel(stages, jobs=2, idle_work=idle)
    cpus = os.cpu_count() or 1
    assert calls[0] == (["quick"], max(1, cpus - max(1, cpus // 2)), False)
    assert len(calls) >= 2 and not calls[1][2] and set(pipe.seconds) == {"quick", "slow"}
