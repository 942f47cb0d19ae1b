"""The study runner (tools/demo_study.py): a quick study end to end, its figures traced to their evaluation
files, a rerun that skips every stage, and its pieces (points, losses, reused evaluations)."""
import json
import math
import os

import numpy as np
import pytest

from tests.helpers import python
from tools.demo.runner import Pipeline
from tools.demo.study import DENOISE_T, MIX_RATIOS, OLD_LEVELS, final_loss, study_points, useless_loss


def test_quick_old_quality_study_end_to_end(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    command = ["tools/demo_study.py", "--study", "old_quality", "--quick", "--methods", "MixBCT", "--out", str(out),
               "--data", str(data), "--bootstrap", "10"]
    proc = python(*command, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "old_quality" / "results.json").read_text())
    assert results["study"] == "old_quality" and results["seeds"] == 1 and results["bootstrap"]["resamples"] == 10
    assert results["complete"] and results["points_planned"] == 3
    names = [p["name"] for p in results["points"]]
    assert names == ["OPclass_old4x1", "OPclass_old8x2", "OPclass_old12x3"]   # weak to strong
    for point in results["points"]:
        assert [r["label"] for r in point["runs"]] == ["independent", "MixBCT"]
        row_of = {(r["method"], r["test"], r["metric"]): r for r in point["rows"]}
        # a figure of results.json is the one of the evaluation file it came from
        stored = json.loads((out / "points" / point["name"] / "eval" / "MixBCT_cross_11.json").read_text())
        assert row_of[("MixBCT", "cross", "TAR@FAR=1e-3")]["value"] == stored["TAR@FAR"]["1e-3"]
        old = json.loads((out / "points" / point["name"] / "eval" / "old_self_1N.json").read_text())
        assert row_of[("old", "self", "top1")]["value"] == old["top1"]
        margin = row_of[("MixBCT", "cross", "top1")]
        assert margin["margin"] == pytest.approx(margin["value"] - old["top1"])
        cost, low, high = point["self_costs"]["MixBCT"]["TAR@FAR=1e-3"]
        assert cost == pytest.approx(row_of[("MixBCT", "self", "TAR@FAR=1e-3")]["value"]
                                     - row_of[("independent", "self", "TAR@FAR=1e-3")]["value"])
        assert -1 <= low <= high <= 1
        old_loss = point["losses"]["old"]
        assert old_loss["classes"] == 12 and old_loss["useless"] == pytest.approx(math.log(12))
        assert point["losses"]["MixBCT"]["classes"] == 28
        assert (out / "old_quality" / point["name"] / "results.md").is_file()   # the demo's table of the point
    # the old models differ by level; the independent model is one model shared by every level
    sizes = {p["name"]: (p["sizes"]["old_width"], p["sizes"]["old_epochs"]) for p in results["points"]}
    assert sorted(sizes.values()) == sorted(OLD_LEVELS["quick"])
    shared = [(out / "points" / n / "independent" / "model.pt").read_bytes() for n in names]
    assert shared[1] == shared[0] and shared[2] == shared[0]
    assert proc.stdout.count("[train_independent] shared from point OPclass_old4x1") == 2
    table = (out / "old_quality" / "results.md").read_text()
    assert "| OPclass_old4x1 | MixBCT |" in table and "useless" in table
    assert (out / "old_quality" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rerun = python(*command, timeout=300)   # every point's outputs exist: nothing is trained or evaluated again
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "running" not in rerun.stdout and rerun.stdout.count("[eval_MixBCT] reused") == 3
    again = json.loads((out / "old_quality" / "results.json").read_text())
    assert [p["rows"] for p in again["points"]] == [p["rows"] for p in results["points"]]


def test_study_points():
    denoise, = study_points("denoise", "full", ["L2", "MixBCT"])
    assert (denoise.name, denoise.sizes) == ("OPclass_old8x2", {"old_width": 8, "old_epochs": 2})
    labels = [r.label for r in denoise.runs]
    assert labels == ["independent", "MixBCT T=0.9 r=0.3", "MixBCT T=off", "MixBCT T=0.7", "MixBCT T=0.5",
                      "MixBCT r=0.1", "MixBCT r=0.5", "MixBCT r=1.0"]
    assert len(labels) == 1 + 1 + (len(DENOISE_T) - 1) + (len(MIX_RATIOS) - 1)
    assert [r.denoise_t for r in denoise.runs[2:5]] == [1.0, 0.7, 0.5] and denoise.runs[5].keys == {"mix_ratio": 0.1}
    scenarios = study_points("scenarios", "full", ["L2", "MixBCT"])
    assert [p.name for p in scenarios] == ["OPclass_old8x2", "OPdata_old8x2", "EXclass_old8x2", "EXdata_old8x2"]
    assert [r.label for r in scenarios[0].runs] == ["independent", "L2", "MixBCT"]
    levels = study_points("old_quality", "full", ["MixBCT"])
    assert [p.name for p in levels] == ["OPclass_old4x2", "OPclass_old8x2", "OPclass_old12x6"]


def test_final_loss_is_the_last_logged_line(tmp_path):
    log = tmp_path / "training.log"
    log.write_text("Training: config x.py: 11200 images, 1400 classes, 1 process(es) on cpu\n"
                   "Training: Speed 300.0 samples/sec   Loss 12.5300 (cls 8.7865 l2 0.3743)   LearningRate 0.1\n"
                   "Training: Speed 310.0 samples/sec   Loss 3.1000 (cls 2.5000 l2 0.6000)   LearningRate 0.0\n"
                   "Training: saved model.pt after 1050 steps\n")
    assert final_loss(str(log)) == {"loss": 3.1, "cls": 2.5, "classes": 1400}
    log.write_text("Training: config y.py: 4800 images, 600 classes\nTraining: Speed 9.0   Loss 3.5553 ()   Lr\n")
    assert final_loss(str(log)) == {"loss": 3.5553, "cls": 3.5553, "classes": 600}
    assert final_loss(str(tmp_path / "missing.log")) == {"loss": None, "cls": None, "classes": None}


def test_useless_loss():
    assert useless_loss(600, arcface=False) == pytest.approx(6.3969, abs=1e-4)
    # ArcFace s 32, m 0.3, embeddings orthogonal to every centre: target logit −32 sin 0.3, the others 0
    target = -32 * math.sin(0.3)
    expected = -math.log(math.exp(target) / (math.exp(target) + 1399))
    assert useless_loss(1400, arcface=True) == pytest.approx(expected)
    assert useless_loss(None, arcface=True) is None


def test_stored_evaluations_are_reused_only_when_fresh(tmp_path):
    pipe = Pipeline(str(tmp_path), {}, True, reuse_evaluations=True)
    model, old = tmp_path / "model.pt", tmp_path / "old_self_11.npz"
    model.write_bytes(b"m")
    old.write_bytes(b"o")
    os.makedirs(tmp_path / "eval")
    stems = [tmp_path / "eval" / f"run_{t}" for t in ("self_11", "self_1N", "cross_11", "cross_1N")]
    for stem in stems:
        np.savez(f"{stem}.npz", x=np.zeros(1))
        stem.with_suffix(".json").write_text(json.dumps({"protocol": "1:1", "bootstrap": {"resamples": 5}}))
    stamp = os.path.getmtime(model) + 10
    for stem in stems:
        os.utime(f"{stem}.json", (stamp, stamp))
    results, embeddings = pipe._stored_results(str(tmp_path / "eval"), "run", str(model), str(old), 5)
    assert [test for test, _, _ in results] == ["self", "self", "cross", "cross"] and embeddings == f"{stems[0]}.npz"
    assert pipe._stored_results(str(tmp_path / "eval"), "run", str(model), str(old), 7) is None   # other resamples
    os.utime(model, (stamp + 5, stamp + 5))                                                       # retrained since
    assert pipe._stored_results(str(tmp_path / "eval"), "run", str(model), str(old), 5) is None
    assert Pipeline(str(tmp_path), {}, True)._stored_results(str(tmp_path / "eval"), "run", str(model), None, 5) is None


BAD_OPTIONS = [("--methods", "MixBCT,Foo", "--methods: unknown method 'Foo'"),
               ("--seeds", "0", "--seeds must be at least 1, got 0")]


@pytest.mark.parametrize("option, value, message", BAD_OPTIONS)
def test_study_refuses_bad_options(tmp_path, option, value, message):
    proc = python("tools/demo_study.py", "--study", "old_quality", "--quick", option, value, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "out").exists()
