"""compat_eval: protocol sampling, metric values against brute force, the matrix and verdicts end to end,
the embedding pass shared by two gloo ranks and resumed after an interruption."""
import itertools
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from tests.helpers import chunk_files, free_port, make_tiny_rec, python
from tools.compat_eval import compat_eval as ce
from tools.compat_eval import data
from tools.compat_eval import protocol as cp
from tools.ijbc_eval import metrics

TINY = ["--networks", "r18", "--widths", "8", "--input_sizes", "32", "--image_size", "32", "--num_workers", "0"]


# ------------------------------------------------------------------------------------ protocol
def test_unrank_pairs_enumerates_all_pairs_in_order():
    i, j = data.unrank_pairs(np.arange(45))
    want = [(a, b) for b in range(10) for a in range(b)]
    assert list(zip(i.tolist(), j.tolist())) == want
    big = np.array([10 ** 12, 5 * 10 ** 11 + 7])
    i, j = data.unrank_pairs(big)
    assert ((j * (j - 1) // 2 + i) == big).all() and (i < j).all()


def test_verification_pairs_all_genuine_and_distinct_impostors():
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 1, 1])
    first, second, genuine = data.verification_pairs(labels, impostors=10, seed=3)
    pairs = set(zip(first.tolist(), second.tolist()))
    want_genuine = {(a, b) for a, b in itertools.combinations(range(9), 2) if labels[a] == labels[b]}
    assert {p for p, g in zip(zip(first.tolist(), second.tolist()), genuine) if g} == want_genuine
    assert len(pairs) == len(first) and (~genuine).sum() == 10
    assert (labels[first[~genuine]] != labels[second[~genuine]]).all() and (first < second).all()
    again = data.verification_pairs(labels, impostors=10, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((first, second, genuine), again))
    # more impostors asked than exist: all of them; max_genuine samples without repetition
    first, second, genuine = data.verification_pairs(labels, max_genuine=4, impostors=1000, seed=0)
    assert genuine.sum() == 4 and (~genuine).sum() == 36 - len(want_genuine)
    assert len(set(zip(first.tolist(), second.tolist()))) == len(first)


def test_identification_split():
    labels = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    gallery, probes, mated = data.identification_split(labels, gallery_per_id=2, nonmated_share=0.2, seed=1)
    assert len(mated) == 8 and (gallery ^ probes).all()
    held_out = np.setdiff1d(np.arange(10), mated)
    assert not gallery[np.isin(labels, held_out)].any()
    enrolled = np.bincount(labels[gallery], minlength=10)
    assert (enrolled[mated] == np.minimum(2, np.bincount(labels)[mated])).all()


# ------------------------------------------------------------------------------ metrics vs brute force
def _clustered(rng, labels, d=8, spread=0.9):
    feats = rng.normal(size=(labels.max() + 1, d))[labels] + spread * rng.normal(size=(len(labels), d))
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


def test_cell_figures_match_brute_force():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), rng.integers(2, 6, 12))
    old, new = _clustered(rng, labels), _clustered(rng, labels)
    protocol = cp.Protocol(labels, impostors=300, gallery_per_id=1, nonmated_share=0.25, seed=0)
    figures, _ = protocol.cell(new, old)
    # 1:1: first image from the gallery (old) model, second from the query (new) model
    scores = np.array([float(old[a] @ new[b]) for a, b in zip(protocol.first, protocol.second)])
    fpr, tpr, _ = roc_curve(protocol.genuine, scores)
    for key in cp.FAR_KEYS:
        best = min(range(len(fpr)), key=lambda k: (abs(fpr[k] - float(key)), -tpr[k]))
        assert figures[f"TAR@FAR={key}"] == pytest.approx(tpr[best])
    # 1:N: one template per gallery identity (its enrolled old features), probes from the new model
    ids = protocol.mated_identities
    templates = {c: old[protocol.gallery_images[labels[protocol.gallery_images] == c]].sum(0) for c in ids}
    hits1 = hits5 = 0
    mated_rows, nonmated_best = [], []
    for p in protocol.probe_images:
        sims = {c: float(new[p] @ t / np.linalg.norm(t)) for c, t in templates.items()}
        if labels[p] in templates:
            rank = sum(s > sims[labels[p]] for s in sims.values())
            hits1 += rank < 1
            hits5 += rank < 5
            mated_rows.append((sims[labels[p]], rank == 0))
        else:
            nonmated_best.append(max(sims.values()))
    assert figures["top1"] == pytest.approx(hits1 / len(mated_rows))
    assert figures["top5"] == pytest.approx(hits5 / len(mated_rows))
    for key in cp.FPIR_KEYS:
        ordered = sorted(nonmated_best, reverse=True)
        threshold = ordered[max(math.floor(len(ordered) * float(key)) - 1, 0)]
        want = np.mean([correct and s > threshold for s, correct in mated_rows])
        assert figures[f"TPIR@FPIR={key}"] == pytest.approx(want, abs=1e-9)


def test_blocked_search_equals_one_block():
    rng = np.random.default_rng(1)
    gallery, probes = _clustered(rng, np.arange(20)), _clustered(rng, rng.integers(0, 25, 60))
    subjects, probe_subjects = np.arange(20), rng.integers(0, 25, 60)
    whole = metrics.search(probes @ gallery.T, subjects, probe_subjects)
    blocked = cp.search(probes, gallery, subjects, probe_subjects, block=50, depth=20)   # the whole gallery listed
    for name in ("mated", "rank", "correct"):
        np.testing.assert_array_equal(getattr(blocked, name), getattr(whole, name))
    np.testing.assert_allclose(blocked.score, whole.score, atol=1e-6)
    np.testing.assert_allclose(blocked.nonmated_best, whole.nonmated_best, atol=1e-6)


@pytest.mark.parametrize("trial", range(40))
def test_top_k_search_equals_the_full_search_with_ties(trial):
    """Small-integer features make exact ties (duplicate templates, repeated subjects); ranks agree
    below the depth and read ``depth`` above it, whatever the blocking."""
    rng = np.random.default_rng(trial)
    size, count = int(rng.integers(1, 30)), int(rng.integers(1, 40))
    gallery = rng.integers(-2, 3, (size, 6)).astype(np.float32)
    gallery[size // 2:] = gallery[:size - size // 2]
    probes = rng.integers(-2, 3, (count, 6)).astype(np.float32)
    probes[:min(count, size)] = gallery[:min(count, size)]
    subjects = rng.integers(0, size, size) if trial % 2 else np.arange(size)
    probe_subjects = rng.integers(0, size + 4, count)
    whole = metrics.search(probes @ gallery.T, subjects, probe_subjects)
    for block in (7, 1 << 20):
        found = cp.search(probes, gallery, subjects, probe_subjects, block=block, depth=4)
        np.testing.assert_array_equal(found.mated, whole.mated)
        np.testing.assert_array_equal(found.rank, np.minimum(whole.rank, min(4, size)))
        np.testing.assert_array_equal(found.correct, whole.correct)
        listed = whole.rank < 4
        np.testing.assert_array_equal(found.score[listed], whole.score[listed])
        np.testing.assert_array_equal(found.nonmated_best, whole.nonmated_best)


def test_top_k_lists_the_best_columns():
    rng = np.random.default_rng(3)
    gallery, probes = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(50, 16)).astype(np.float32)
    values, columns = cp.top_k(probes, gallery, 5, block=1000, probe_rows=16)     # 62-column chunks
    sims = probes @ gallery.T
    np.testing.assert_array_equal(columns, np.argsort(-sims, 1)[:, :5])
    np.testing.assert_allclose(values, -np.sort(-sims, 1)[:, :5], atol=1e-5)


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A RecordIO set, the same faces as an image folder, and three tiny 16-d models."""
    from backbones import get_model
    from utils.dataset import MXFaceDataset

    root = tmp_path_factory.mktemp("compat")
    rec = make_tiny_rec(str(root / "rec"), num_classes=6, per_class=6, size=32)
    faces = MXFaceDataset(rec, train=False, uint8=True, input_size=32)
    for i in range(len(faces)):
        image, label, _ = faces[i]
        os.makedirs(root / "folder" / f"id{int(label)}", exist_ok=True)
        cv2.imwrite(str(root / "folder" / f"id{int(label)}" / f"{i:03d}.png"), image.numpy().transpose(1, 2, 0)[..., ::-1])
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(str(root / f"v{seed + 1}.pt"))
        torch.save(get_model("r18", num_features=16, width=8, input_size=32).state_dict(), models[-1])
    return dict(root=root, rec=rec, folder=str(root / "folder"), models=models)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models run faster so on a few busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tiny, name, *argv):
    out = str(tiny["root"] / "out" / name)
    result = ce.main([*argv, *TINY, "-R", out, "--bootstrap", "10", "--impostors", "200", "--metric", "TAR@FAR=1e-1"])
    return result, out


def test_three_generations_on_a_rec_and_the_same_on_a_folder(tiny):
    result, out = _run(tiny, "rec3", "--rec", tiny["rec"], "--models", *tiny["models"], "-E", "--independent", "v3")
    assert result["generations"] == ["v1", "v2", "v3"] and len(result["cells"]) == 9
    assert [(v["generation"], v["earlier"]) for v in result["verdicts"]] == [("v2", "v1"), ("v3", "v1"), ("v3", "v2")]
    for suffix in (".json", ".md", ".png", ".npz"):
        assert os.path.getsize(out + suffix) > 0
    with open(out + ".json") as handle:
        assert json.load(handle)["cells"] == json.loads(json.dumps(result["cells"]))
    with open(out + ".md") as handle:
        assert "| query \\ gallery | v1 | v2 | v3 |" in handle.read()
    folder, _ = _run(tiny, "folder3", "--data", tiny["folder"], "--models", *tiny["models"])
    for a, b in zip(result["cells"], folder["cells"]):          # PNG crops of the same JPEG decodes
        assert a["TAR@FAR=1e-1"] == pytest.approx(b["TAR@FAR=1e-1"], abs=0.05)
    restored, _ = _run(tiny, "restored", "--restore_embs", out + ".npz", "--rec", tiny["rec"], "--independent", "3")
    assert restored["cells"] == result["cells"]
    self_test = {(c["query"], c["gallery"]): c["TAR@FAR=1e-1"] for c in result["cells"]}
    for run in (result, restored):          # the decision: each candidate against the oldest gallery, v3 the reference
        answers = {a["candidate"]: a for a in run["decision"]["answers"]}
        assert list(answers) == ["v2 queries → v1 gallery", "v3 queries → v1 gallery"]
        assert answers["v2 queries → v1 gallery"]["self_test_change"] == pytest.approx(
            self_test["v2", "v2"] - self_test["v3", "v3"]) and answers["v3 queries → v1 gallery"]["self_test_change"] == 0
        v2 = next(v for v in run["verdicts"] if v["generation"] == "v2")
        assert [f["margin"] for f in answers["v2 queries → v1 gallery"]["figures"]] == [
            v2["margin"], pytest.approx(v2["margins"]["top1"]["cross"] - v2["margins"]["top1"]["self"])]
    assert set(result["cost"]["reextraction_seconds_per_million_images"]) == {"v1", "v2", "v3"}
    assert min(result["cost"]["reextraction_seconds_per_million_images"].values()) > 0
    assert restored["cost"]["reextraction_seconds_per_million_images"] == {}
    assert "re-extraction not measured" in restored["decision"]["answers"][0]["detail"]


def test_diagonal_is_each_models_self_test_and_a_model_is_compatible_with_itself(tiny):
    v1, v2 = tiny["models"][:2]
    pair, _ = _run(tiny, "two", "--rec", tiny["rec"], "--models", v1, v2)
    alone, _ = _run(tiny, "alone", "--rec", tiny["rec"], "--models", v2)
    diagonal = next(c for c in pair["cells"] if c["query"] == c["gallery"] == "v2")
    assert diagonal == alone["cells"][0] and alone["verdicts"] == []
    same, _ = _run(tiny, "same", "--rec", tiny["rec"], "--models", v1, v1, "--names", "old", "new")
    verdict, = same["verdicts"]
    assert verdict["compatible"] and verdict["margin"] == 0 and not verdict["interval_excludes_zero"]


def test_report_marks_figures_the_impostor_pairs_cannot_carry(tiny):
    """With 200 impostor pairs TAR@FAR=1e-5…1e-3 all sit at the highest impostor score: shown as n/m, not numbers."""
    from tools.compat_eval.report import format_report

    result, out = _run(tiny, "nm", "--rec", tiny["rec"], "--models", *tiny["models"][:2])
    assert result["protocol"]["impostor_pairs"] == 200
    text = format_report(result)
    row = next(line for line in text.splitlines() if line.startswith("| v1 | v2 | "))
    assert row.split(" | ")[2:5] == ["n/m"] * 3 and "n/m" not in row.split(" | ")[5]
    assert ("n/m: not measurable with this data: TAR@FAR=1e-5 needs at least 100,000 impostor pairs, TAR@FAR=1e-4 "
            "needs at least 10,000 impostor pairs, TAR@FAR=1e-3 needs at least 1,000 impostor pairs; this evaluation "
            "has 200") in text
    assert "is not measurable with this data" not in text     # the main metric, TAR@FAR=1e-1, is
    result["metric"] = "TAR@FAR=1e-3"
    assert "The main metric TAR@FAR=1e-3 is not measurable with this data" in format_report(result)


FRACTIONS = [round(0.1 * k, 1) for k in range(11)]


def curve(query, order, tar, top1, merge="plain", gallery="old"):
    """A hand-made backfill entry: the two figures along the fractions, the old self-test at 0.5 for both,
    negative flips k/100 at fraction k/10 (1:N) and k/1000 (1:1 genuine)."""
    return {"query": query, "gallery": gallery, "order": order, "merge": merge, "fractions": FRACTIONS,
            "metrics": {"TAR@FAR=1e-2": tar, "top1": top1}, "old_self": {"TAR@FAR=1e-2": 0.5, "top1": 0.5},
            "negative_flips": [k / 100 for k in range(11)], "negative_flips_genuine": [k / 1000 for k in range(11)],
            "flip_far": 0.01}


def test_backfill_safety_is_the_fraction_after_the_last_dip():
    """Below the old level at 20 % and 30 %, never after: from 40 %, with the flips at 40 %; the earliest
    deployable curve is the answer, every curve is listed; a curve ending below gives no fraction."""
    from tools.compat_eval import decision

    above = [0.6] * 11
    dip = [0.52, 0.51, 0.48, 0.49, 0.5, 0.55, 0.6, 0.62, 0.64, 0.66, 0.7]   # equal to the old level counts as not below
    entries = [curve("new", "random", dip, above), curve("new", "norm", above, [0.55] * 3 + [0.45] + [0.6] * 7),
               curve("new", "oracle", above, above), curve("other", "random", above, above)]
    safety = decision.backfill_safety(entries, "new", "old", ["TAR@FAR=1e-2", "top1"])
    assert [(c["order"], c["from_fraction"]) for c in safety["curves"]] == [
        ("random", 0.4), ("norm", 0.4), ("oracle", 0.0)]
    assert (safety["order"], safety["from_fraction"]) == ("random", 0.4)     # the first of the earliest; no oracle
    assert safety["negative_flips"] == 0.04 and safety["negative_flips_genuine"] == 0.004
    assert "never falls below the old system from 40 % re-extracted (random order, plain merge; negative flips " \
           "there: 1:N top-1 0.040, 1:1 genuine at FAR=0.01 0.004)" in decision.backfill_text(safety)
    only_top1 = decision.backfill_safety(entries[:1], "new", "old", ["top1"])
    assert only_top1["from_fraction"] == 0.0 and only_top1["negative_flips"] == 0.0
    ends_below = decision.backfill_safety([curve("new", "random", above, above[:10] + [0.4])], "new", "old", ["top1"])
    assert ends_below["from_fraction"] is None and "ends below the old system" in decision.backfill_text(ends_below)
    assert decision.safe_from([[0.6, float("nan"), 0.6]], [0.5]) == 2
    assert decision.backfill_safety(entries, "new", "elder", ["top1"]) is None


def _verdict(generation, gallery, margins, **extra):
    """A verdict with the margins ``{metric: (margin, low, high)}`` over the self-test of 0.5."""
    return dict(generation=generation, earlier=gallery, margin=margins["TAR@FAR=1e-2"][0],
                margins={m: {"cross": 0.5 + v, "self": 0.5, "margin": v, "interval": [lo, hi]}
                         for m, (v, lo, hi) in margins.items()}, **extra)


def test_decision_judges_tar_and_top1_with_backfill_self_test_and_cost():
    """yes/no/undecided from the paired intervals of both figures; the self-test against --independent,
    the backfill answer, the measured cost and the recommended path with its reason."""
    from tools.compat_eval.report import decision_of, decision_section

    cells = [{"query": q, "gallery": g, "TAR@FAR=1e-2": v, "top1": v} for q, g, v in
             (("old", "old", 0.5), ("new", "new", 0.7), ("free", "free", 0.8), ("new", "old", 0.55),
              ("free", "old", 0.3), ("free", "old + linear", 0.6), ("old", "new", 0.5), ("new", "free", 0.1),
              ("free", "new", 0.1), ("old", "free", 0.1))]
    up, down, across = (0.05, 0.01, 0.09), (-0.05, -0.09, -0.01), (0.01, -0.02, 0.04)
    result = {"generations": ["old", "new", "free"], "metric": "TAR@FAR=1e-2", "protocol": {"impostor_pairs": 1000},
              "cells": cells, "independent": "free",
              "verdicts": [_verdict("new", "old", {"TAR@FAR=1e-2": up, "top1": across}),
                           _verdict("free", "old", {"TAR@FAR=1e-2": down, "top1": down}),
                           _verdict("free", "new", {"TAR@FAR=1e-2": down, "top1": down}),
                           _verdict("free", "old + linear", {"TAR@FAR=1e-2": up, "top1": up}, self_of="old")],
              "backfill": [curve("new", "random", [0.4] * 3 + [0.6] * 8, [0.6] * 11)],
              "cost": {"transform_seconds_per_million_features": 0.25,
                       "reextraction_seconds_per_million_images": {"new": 900.0, "free": 1200.0}}}
    record = decision_of(result)
    assert [(a["candidate"], a["kind"], a["answer"]) for a in record["answers"]] == [
        ("new queries → old gallery", "model", "undecided"), ("free queries → old gallery", "model", "no"),
        ("free queries → old + linear gallery", "transform", "yes")]     # free → new: not about the oldest gallery
    new = record["answers"][0]
    assert new["figures"] == [{"metric": "TAR@FAR=1e-2", "margin": 0.05, "interval": [0.01, 0.09], "verdict": "compatible"},
                              {"metric": "top1", "margin": 0.01, "interval": [-0.02, 0.04], "verdict": "undecided"}]
    assert new["self_test_change"] == pytest.approx(-0.1) and new["backfill"]["from_fraction"] == 0.3
    text = "\n".join(decision_section(result))
    assert ("- new queries → old gallery: **undecided** (TAR@FAR=1e-2 +0.050 [+0.010, +0.090] compatible, top1 +0.010 "
            "[-0.020, +0.040] undecided; self-test -0.100 (TAR@FAR=1e-2) against free; a background backfill never "
            "falls below the old system from 30 % re-extracted (random order, plain merge; negative flips there: 1:N "
            "top-1 0.030, 1:1 genuine at FAR=0.01 0.003); cost: re-extraction 900 s per million images)") in text
    assert "- free queries → old gallery: **no** (TAR@FAR=1e-2 -0.050 [-0.090, -0.010] not compatible" in text
    assert ("not compatible; self-test +0.000 (TAR@FAR=1e-2) against free; backfill not measured; cost: re-extraction "
            "1.2e+03 s per million images") in text
    assert ("- free queries → old + linear gallery: **yes** (TAR@FAR=1e-2 +0.050 [+0.010, +0.090] compatible, top1 "
            "+0.050 [+0.010, +0.090] compatible; self-test +0.000 (TAR@FAR=1e-2) against free; cost: transform 0.25 s "
            "per million features against re-extraction 1.2e+03 s per million images)") in text
    assert ("Recommended path: map the stored gallery with the linear transform and search it with free's queries. "
            "Why: the mapped gallery is compatible with free's queries on TAR@FAR=1e-2 and top1, at a self-test change "
            "of +0.000 against free; mapping takes 0.25 s per million features against 1.2e+03 s per million images "
            "for re-extraction.") in text

    result["verdicts"][0] = _verdict("new", "old", {"TAR@FAR=1e-2": up, "top1": up})   # compatible, but -0.1 self-test
    record = decision_of(result)
    assert record["recommended_path"].startswith("map the stored gallery with the linear transform")
    assert ", and free gives up the least self-test of the compatible candidates (+0.000 against free)" in record["why"]
    result["verdicts"].pop()                          # no transform: the compatible new model
    record = decision_of(result)
    assert record["recommended_path"] == ("deploy new: its queries search the old gallery as it "
                                          "is; re-extract the gallery in the background (never below the old system "
                                          "from 30 % re-extracted)")
    assert record["why"] == "its queries are compatible with the old gallery on TAR@FAR=1e-2 and top1, at a self-test " \
                            "change of -0.100 against free"

    del result["independent"], result["cost"], result["backfill"]
    result["verdicts"] = result["verdicts"][:2]
    result["verdicts"][0] = _verdict("new", "old", {"TAR@FAR=1e-2": across, "top1": up})
    text = "\n".join(decision_section(result))
    assert "backfill not measured; cost: re-extraction not measured)" in text and "self-test" not in text
    assert "Recommended path: re-enrol (backfill) the gallery with the new model before its queries use it. Why: no " \
           "candidate is shown to serve the old gallery as it is (the undecided ones need more test identities" in text
    result["protocol"]["impostor_pairs"] = 50          # TAR@FAR=1e-2 not measurable: no answer from it
    result["verdicts"][0] = _verdict("new", "old", {"TAR@FAR=1e-2": up, "top1": up})
    text = "\n".join(decision_section(result))
    assert "- new queries → old gallery: **undecided** (TAR@FAR=1e-2 n/m, top1 +0.050" in text


def test_heatmap_names_its_metric_and_shows_each_cells_interval(tmp_path, monkeypatch):
    import matplotlib.figure

    from tools.compat_eval.report import plot_matrix

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig) or
                        open(path, "wb").write(b"\x89PNG"))
    cells = [{"query": q, "gallery": g, "TAR@FAR=1e-2": v, "interval": {"TAR@FAR=1e-2": [v - 0.1, v + 0.05]}}
             for (q, g), v in ((("a", "a"), 0.5), (("a", "b"), 0.25), (("b", "a"), 0.75), (("b", "b"), 0.125))]
    result = {"generations": ["a", "b"], "metric": "TAR@FAR=1e-2", "cells": cells, "bootstrap": 50,
              "protocol": {"identities": 40, "impostor_pairs": 1000}}
    plot_matrix(result, str(tmp_path / "m.png"))
    ax = saved[0].axes[0]
    assert [t.get_text() for t in ax.texts] == ["0.500\n[0.400, 0.550]", "0.250\n[0.150, 0.300]",
                                                "0.750\n[0.650, 0.800]", "0.125\n[0.025, 0.175]"]
    assert ax.get_title().startswith("TAR@FAR=1e-2 of each query vs gallery generation\nin brackets: 95 % interval")
    result["protocol"]["impostor_pairs"] = 50
    plot_matrix(result, str(tmp_path / "m.png"))
    assert {t.get_text() for t in saved[1].axes[0].texts} == {"n/m"}


def test_demo_and_compat_eval_decide_alike():
    """The same margins, curves and cost give the same answers and figures in the demo and compat_eval."""
    from tools.compat_eval.report import decision_of as compat_decision
    from tools.demo.report import decision_of as demo_decision

    up, across = (0.05, 0.01, 0.09), (0.01, -0.02, 0.04)
    entries = [curve("new", "random", [0.4] * 3 + [0.6] * 8, [0.6] * 11, gallery=g) for g in ("old",)]
    for entry in entries:
        entry["metrics"]["TAR@FAR=1e-3"] = entry["metrics"].pop("TAR@FAR=1e-2")
        entry["old_self"]["TAR@FAR=1e-3"] = entry["old_self"].pop("TAR@FAR=1e-2")
    margins = {"TAR@FAR=1e-3": up, "top1": across}
    result = {"generations": ["old", "new"], "metric": "TAR@FAR=1e-3", "protocol": {"impostor_pairs": 5000},
              "cells": [{"query": q, "gallery": g, "TAR@FAR=1e-3": 0.5, "top1": 0.5} for q in ("old", "new")
                        for g in ("old", "new")], "backfill": entries,
              "verdicts": [dict(_verdict("new", "old", {**margins, "TAR@FAR=1e-2": up}),
                                margins={m: {"margin": v, "interval": [lo, hi]} for m, (v, lo, hi) in margins.items()})],
              "cost": {"reextraction_seconds_per_million_images": {"new": 800.0}}}
    rows = [dict(method="old", test="self", metric=m, value=0.5, ci_low=0.4, ci_high=0.6) for m in margins]
    rows += [dict(method="new", test="cross", metric=m, value=0.5 + v, ci_low=0.4, ci_high=0.6, margin=v,
                  margin_ci_low=lo, margin_ci_high=hi, **({"impostor_pairs": 5000} if m.startswith("TAR") else {}))
             for m, (v, lo, hi) in margins.items()]
    demo = demo_decision(rows, {"protocol": {"impostor_pairs": 5000}, "backfill": entries},
                         {"seconds_per_million": {}, "backfill_seconds_per_million": 800.0})
    compat = compat_decision(result)
    for a, b in zip(demo["answers"], compat["answers"]):
        assert {k: v for k, v in a.items() if k != "candidate"} == {k: v for k, v in b.items() if k != "candidate"}
    assert demo["rule"] == compat["rule"] and demo["answers"][0]["answer"] == "undecided"


# -------------------------------------------------------------------------------- embedding pass
def _main_on_rank(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ce.CHUNK_IMAGES = 8      # the 36 images in five chunks, dealt to the two ranks
    assert (ce.main(argv) is None) == (rank != 0)


def test_two_gloo_ranks_give_the_single_process_embeddings_and_result(tiny, tmp_path):
    import torch.multiprocessing as mp

    argv = ["--rec", tiny["rec"], "--models", *tiny["models"][:2], *TINY, "-b", "4", "--device", "cpu",
            "--bootstrap", "10", "--impostors", "200", "-E"]
    mp.spawn(_main_on_rank, args=(2, free_port(), [*argv, "-R", str(tmp_path / "shared")]), nprocs=2, join=True)
    single = ce.main([*argv, "-R", str(tmp_path / "single")])
    with np.load(tmp_path / "shared.npz") as shared, np.load(tmp_path / "single.npz") as alone:
        assert shared.files == alone.files
        for key in alone.files:
            np.testing.assert_array_equal(shared[key], alone[key])
    with open(tmp_path / "shared.json") as handle:
        assert json.load(handle)["cells"] == json.loads(json.dumps(single["cells"]))


def test_interrupted_embedding_resumes_from_cached_chunks(tiny, tmp_path, monkeypatch, capsys):
    from tools.ijbc_eval.embed import Embedder

    cache, calls, real = str(tmp_path / "cache"), [], Embedder.__call__

    def counting(self, images, crash_at=None):
        calls.append(len(images))
        if len(calls) == crash_at:
            raise KeyboardInterrupt("simulated preemption")
        return real(self, images)

    monkeypatch.setenv("BCT_CACHE_DIR", cache)
    monkeypatch.setattr(ce, "CHUNK_IMAGES", 8)
    argv = ["--rec", tiny["rec"], "--models", *tiny["models"][:2], "-b", "4"]
    expected, _ = _run(tiny, "whole", *argv)
    monkeypatch.setattr(Embedder, "__call__", lambda self, images: counting(self, images, crash_at=11))
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, "resumed", *argv)
    assert len(chunk_files(cache)) == 2      # calls 1–2 probe the sizes; 3–10 are 4 batches (both models) = 16 images
    calls.clear()
    monkeypatch.setattr(Embedder, "__call__", lambda self, images: counting(self, images))
    resumed, _ = _run(tiny, "resumed", *argv)
    assert "resuming: 2 of 5 chunks" in capsys.readouterr().out
    assert sum(calls) == 2 * (1 + 36 - 16)   # both models: size probe, then the images after chunk 2
    assert resumed["cells"] == expected["cells"] and not chunk_files(cache)


def test_options_are_checked_before_any_image_is_embedded(tiny, tmp_path, monkeypatch):
    """A bad --metric, --transform (file or size), --transform_generations or --backfill stops before the
    embedding pass (which here would fail the test)."""
    from tools.transform import transforms
    from utils.errors import UserError

    def no_embedding(*args, **kwargs):
        raise AssertionError("images embedded before the options were checked")

    monkeypatch.setattr(ce, "embed", no_embedding)
    wrong_size = transforms.save(transforms.build("linear", 16, 8), str(tmp_path / "h8.pt"))
    good = transforms.save(transforms.build("linear", 16, 16), str(tmp_path / "h16.pt"))
    for extra, message in ((["--metric", "TAR@FAR=1e-9"], "--metric TAR@FAR=1e-9"),
                           (["--transform", tiny["models"][0]], "not a gallery transform"),
                           (["--transform", wrong_size], "maps 16-d embeddings to 8-d ones"),
                           (["--transform", good, "--transform_generations", "v1", "v9"], "v9 is neither"),
                           (["--backfill", "v1", "v9"], "--backfill: unknown generation 'v9'"),
                           (["--independent", "v9"], "--independent: v9 is neither")):
        with pytest.raises(UserError, match=message):
            ce.main(["--rec", tiny["rec"], "--models", *tiny["models"][:2], *TINY, "-R", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("damage", ["cut", "cut_with_end_marker"])
def test_a_damaged_jpeg_is_one_line_without_libjpegs_message(tiny, tmp_path, damage):
    """A JPEG cut short (no end marker: checked; with one: libjpeg complains on file descriptor 2, captured):
    the run stops with our line alone on stderr, exit 2, nothing written."""
    import shutil

    folder = tmp_path / "faces"
    shutil.copytree(tiny["folder"], folder)
    image = cv2.imread(str(next((folder / "id0").iterdir())))
    whole = cv2.imencode(".jpg", image)[1].tobytes()
    cut = whole[:len(whole) // 2] + (b"\xff\xd9" if damage == "cut_with_end_marker" else b"")
    (folder / "id0" / "999.jpg").write_bytes(cut)
    proc = python("tools/compat_eval/compat_eval.py", "--data", str(folder), "--models", *tiny["models"][:2], *TINY,
                  "-R", str(tmp_path / "out" / "report"), "--bootstrap", "0")
    reason = ("truncated JPEG file (no end-of-image marker)" if damage == "cut" else
              "Corrupt JPEG data: premature end of data segment") + " (damaged file: re-save or remove it)"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: cannot read image {folder / 'id0' / '999.jpg'}: {reason}"
    assert [line for line in proc.stderr.splitlines() if "JPEG" in line] == proc.stderr.strip().splitlines()[-1:]
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_progress_lines_per_matrix_cell_and_backfill_curve(tiny, capsys):
    _run(tiny, "backfill_progress", "--rec", tiny["rec"], "--models", *tiny["models"][:2], "--backfill",
         "--backfill_merge", "plain")
    out = capsys.readouterr().out
    assert "backfill curve 1/3: random order, plain merge" in out and "backfill curve 3/3: oracle order" in out
    cells = [line for line in out.splitlines() if line.startswith("cell ")]     # one line per bootstrapped cell
    assert cells == [f"cell {k}/4: {q} queries, {g} gallery, 10 bootstrap resamples"
                     for k, (q, g) in enumerate(itertools.product(("v1", "v2"), repeat=2), 1)]


def test_decision_rules_shared_by_compat_eval_and_the_demo():
    """compat_eval's verdict (the cross-test reaches the earlier self-test) and the demo's (the paired
    interval's side of 0) from one module; the interval is of the per-resample differences."""
    from tools.compat_eval import decision

    assert decision.reaches(0.5, 0.5) and not decision.reaches(0.49, 0.5)
    assert [decision.side_of_zero(*bounds) for bounds in ((0.01, 0.2), (-0.2, -0.01), (-0.1, 0.1), (np.nan, np.nan))] \
        == ["above", "below", "contains", None]
    assert [decision.interval_verdict(0.05, *bounds) for bounds in ((0.01, 0.2), (-0.2, -0.01), (-0.1, 0.1))] \
        == ["compatible", "not compatible", "undecided"]
    assert decision.interval_verdict(0.0, np.nan, np.nan) == "not compatible (no interval)"
    cross, own = np.array([0.52, 0.61, 0.40, np.nan]), np.array([0.50, 0.60, 0.45, 0.5])
    assert decision.paired_interval(cross, own) == pytest.approx(tuple(np.percentile([0.02, 0.01, -0.05], [2.5, 97.5])))
    assert decision.signed_interval(-0.0123, 0.5, 3) == "[-0.012, +0.500]"
