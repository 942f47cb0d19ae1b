"""Own data end to end through the command lines: a folder of crops and a deployed ONNX old model →
packed set → old features, prototypes, denoising → MixBCT → gallery transform → compat_eval verdicts, backfill
curves and its decision section."""
import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import python, synthetic_faces, tiny_train_config

SD_OLD = "f16_deployed_arc_class100"
SD_NEW = "f16_mixbct_arc_class100"
PREPROCESS = "mean=127.5,std=127.5,rgb,no_flip"   # the exported toolkit model's input (training scaling)


def ok(proc):
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def test_pack_onnx_old_model_mixbct_transform_compat_eval(tmp_path):
    pytest.importorskip("onnxruntime")
    from backbones import get_model

    faces = synthetic_faces(tmp_path, 8, 6)    # aligned crops: make_synthetic's renderer
    ok(python("tools/pack_rec.py", faces, str(tmp_path / "data" / "train")))

    torch.manual_seed(0)    # the "deployed" old model: a toolkit backbone exported to ONNX
    torch.save(get_model("r18", num_features=16, width=8, input_size=32).state_dict(), tmp_path / "old.pt")
    ok(python("tools/export_onnx.py", str(tmp_path / "old.pt"), str(tmp_path / "old.onnx"), "-net", "r18",
              "--width", "8", "--input_size", "32"))

    features = str(tmp_path / "features")
    common = ["--dataset", str(tmp_path / "data" / "train"), "--output", features, "--num_workers", "0",
              "--cache_dir", str(tmp_path / "cache")]
    ok(python("tools/get_feature/get_feature.py", "--model", str(tmp_path / "old.onnx"), "--input_size", "32",
              "--preprocess", PREPROCESS, "--SD", SD_OLD, *common))
    ok(python("tools/get_feature/get_avg_feature.py", "--SD", SD_OLD, "--output", features))
    ok(python("tools/get_feature/denoise_credible.py", "--T", "0.9", "--SD", SD_OLD, "--output", features))
    old_features = np.load(os.path.join(features, f"{SD_OLD}_feature.npy"))
    assert old_features.shape == (48, 16)
    assert np.load(os.path.join(features, f"{SD_OLD}_label.npy")).tolist() == np.repeat(np.arange(8), 6).tolist()

    method = tmp_path / "MixBCT"
    method.mkdir()
    (method / "base.py").write_text("from BCT_methods.MixBCT.configs.base import config  # noqa: F401\n")
    config, output = tiny_train_config(
        method / "mixbct.py", str(tmp_path / "data"), str(tmp_path / "new"), num_epoch=1, max_steps=4,
        old_embedding=os.path.join(features, f"{SD_OLD}_feature.npy"),
        credible_old_feature=os.path.join(features, f"{SD_OLD}_credible_ratio_90_feature.npy")), str(tmp_path / "new")
    ok(python("BCT_methods/MixBCT/train.py", config))
    assert os.path.isfile(os.path.join(output, "model.pt"))

    ok(python("tools/get_feature/get_feature.py", config, "--SD", SD_NEW, *common))
    ok(python("tools/transform/fit_transform.py", "--old", os.path.join(features, f"{SD_OLD}_feature.npy"),
              "--new", os.path.join(features, f"{SD_NEW}_feature.npy"), "--kind", "procrustes",
              "-o", str(tmp_path / "h.pt")))

    report = str(tmp_path / "compat" / "report")
    printed = ok(python("tools/compat_eval/compat_eval.py", "--data", faces, "--resize",
                        "--models", str(tmp_path / "old.onnx"), os.path.join(output, "model.pt"),
                        "--names", "deployed", "mixbct", "--networks", "r18", "--widths", "8", "--input_sizes", "32",
                        "--preprocess", PREPROCESS, "--transform", str(tmp_path / "h.pt"), "--bootstrap", "20",
                        "--impostors", "2000", "--metric", "TAR@FAR=1e-1", "--num_workers", "0", "--backfill",
                        "--backfill_merge", "plain", "-R", report))
    result = json.load(open(report + ".json"))
    verdicts = {(v["generation"], v["earlier"]): v for v in result["verdicts"]}
    assert set(verdicts) == {("mixbct", "deployed"), ("mixbct", "deployed + procrustes")}
    transformed = verdicts["mixbct", "deployed + procrustes"]
    assert transformed["self_of"] == "deployed" and transformed["earlier_self"] == verdicts["mixbct", "deployed"][
        "earlier_self"]
    assert "margin_interval" in transformed and result["transform"].endswith("h.pt")
    assert "mixbct → deployed + procrustes: " in printed and "vs deployed self" in printed
    with open(report + ".md") as handle:
        markdown = handle.read()
    question = markdown.index("**Can a new generation serve queries against deployed's gallery without re-enrolment?")
    assert question < markdown.index("|") and "- mixbct queries → deployed gallery: **" in markdown
    assert "Recommended path: " in markdown and "Recommended path: " in printed
    assert result["decision"]["recommended_path"] in markdown
    model, mapped = result["decision"]["answers"]
    assert (model["candidate"], mapped["candidate"]) == ("mixbct queries → deployed gallery",
                                                         "mixbct queries → deployed + procrustes gallery")
    assert [f["metric"] for f in model["figures"]] == ["TAR@FAR=1e-1", "top1"]
    orders = [("random", "plain"), ("norm", "plain"), ("oracle", "plain")]
    assert [(c["order"], c["merge"]) for c in model["backfill"]["curves"]] == orders
    assert [(c["order"], c["merge"]) for c in mapped["backfill"]["curves"]] == orders    # FastFill: h(old) until re-extracted
    assert model["backfill"]["order"] != "oracle" and mapped["backfill"]["order"] != "oracle"
    assert model["cost"]["reextraction_seconds_per_million_images"] > 0
    assert mapped["cost"]["transform_seconds_per_million_features"] > 0
    backfill_answer = "never falls below the old system from" if model["backfill"]["from_fraction"] is not None \
        else "ends below the old system"
    decision = markdown[:markdown.index("Recommended path: ")]
    assert f"- mixbct queries → deployed gallery: **{model['answer']}** (" in decision and backfill_answer in decision
    assert "FastFill (the mapped gallery re-extracted bit by bit): a background backfill " in decision
    assert "per million images" in decision and "per million features" in decision and "Why: " in markdown
