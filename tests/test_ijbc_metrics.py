"""IJB evaluation maths: alignment, template aggregation, 1:1 and 1:N metrics against independent computations."""
import math

import cv2
import numpy as np
import pytest
from sklearn.metrics import auc, roc_curve

from tools.ijbc_eval import metrics
from tools.ijbc_eval.align import TEMPLATE, align_image, umeyama
from utils.errors import UserError


def _skimage_params(src, dst):
    from skimage.transform import SimilarityTransform

    if hasattr(SimilarityTransform, "from_estimate"):
        return SimilarityTransform.from_estimate(src, dst).params
    tform = SimilarityTransform()
    tform.estimate(src, dst)
    return tform.params


def _similarity(angle, scale, shift):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


# --------------------------------------------------------------------------------------------- alignment
def test_umeyama_agrees_with_skimage_on_a_stack():
    rng = np.random.default_rng(0)
    src = TEMPLATE * rng.uniform(0.5, 3, (50, 1, 1)) + rng.normal(0, 4, (50, 5, 2)) + rng.uniform(0, 200, (50, 1, 2))
    src[::7, :, 0] *= -1  # mirrored landmark sets: the best proper similarity, no reflection
    got = umeyama(src)
    want = np.stack([_skimage_params(s, TEMPLATE)[:2] for s in src])
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert (np.linalg.det(got[:, :, :2]) > 0).all()


def test_umeyama_maps_exact_landmarks_onto_the_template():
    forward = _similarity(0.3, 1.8, (40.0, 25.0))
    listed = _apply(forward, TEMPLATE)
    matrix = umeyama(listed)
    np.testing.assert_allclose(_apply(matrix, listed), TEMPLATE, atol=1e-9)
    assert np.isnan(umeyama(np.ones((5, 2)))).all()


def test_warped_image_puts_listed_landmarks_on_the_template():
    listed = _apply(_similarity(-0.25, 1.6, (30.0, 20.0)), TEMPLATE)
    bgr = np.zeros((260, 260, 3), np.uint8)
    for x, y in np.rint(listed).astype(int):
        bgr[y - 2:y + 3, x - 2:x + 3, 0] = 255          # blue dots (BGR channel 0)
    aligned, small = align_image(bgr, umeyama(listed), (112, 56))
    assert aligned.shape == (112, 112, 3) and small.shape == (56, 56, 3)
    assert aligned[..., 0].max() == 0 and aligned[..., 2].max() > 100  # RGB order: blue is channel 2
    blue = aligned[..., 2].astype(float)
    for tx, ty in TEMPLATE:
        x0, y0 = int(tx) - 6, int(ty) - 6
        window = blue[y0:y0 + 13, x0:x0 + 13]
        ys, xs = np.mgrid[y0:y0 + 13, x0:x0 + 13]
        cx, cy = (xs * window).sum() / window.sum(), (ys * window).sum() / window.sum()
        assert math.hypot(cx - tx, cy - ty) <= 1.0
    grey = cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    assert align_image(grey, umeyama(listed), (112,))[0].shape == (112, 112, 3)


# --------------------------------------------------------------------------------------------- templates
def test_image_feature_variants_by_hand():
    embs = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    flips = np.array([[0.0, 4.0], [1.0, 2.0]], np.float32)
    scores = np.array([0.5, 2.0], np.float32)
    np.testing.assert_allclose(metrics.image_features(embs, flips, scores, "N0D1F1"), [[1.5, 4.0], [4.0, 4.0]])
    np.testing.assert_allclose(metrics.image_features(embs, flips, scores, "N0D0F0"), embs)
    np.testing.assert_allclose(metrics.image_features(embs, flips, scores, "N1D0F1"),
                               [[3 / 73 ** 0.5, 8 / 73 ** 0.5], [2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    np.testing.assert_allclose(metrics.image_features(embs, flips, scores, "N1D1F0"), [[0.3, 0.4], [2.0, 0.0]])
    assert len(metrics.VARIANTS) == 8 and metrics.DEFAULT_VARIANT == "N0D1F1"
    with pytest.raises(UserError):
        metrics.variant_flags("N2D1F1")


@pytest.mark.parametrize("values", [np.array([], np.int64), np.array([7]), np.array([3, 1, 3, 2, 1, 1]),
                                    np.random.default_rng(0).integers(-50, 50, 1000),
                                    np.random.default_rng(1).normal(size=300).round(1)])
def test_unique_is_np_unique(values):
    """The sort-based unique gives np.unique's values, inverse and counts (dtypes included)."""
    for kw in ({}, {"return_counts": True}, {"return_inverse": True},
               {"return_inverse": True, "return_counts": True}):
        want, got = np.unique(values, **kw), metrics.unique(values, **kw)
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (want, got))):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        got = metrics.unique(np.sort(values), presorted=True, **kw)
        want = np.unique(np.sort(values), **kw)
        for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (want, got))):
            np.testing.assert_array_equal(a, b)


def test_unique_by_hand():
    values, inverse, counts = metrics.unique([5, 2, 5, 9, 2, 5], return_inverse=True, return_counts=True)
    assert values.tolist() == [2, 5, 9] and inverse.tolist() == [1, 0, 1, 2, 0, 1] and counts.tolist() == [2, 3, 1]


def test_template_is_normalised_sum_of_media_means():
    # template 7: media 1 has frames a, b; media 2 has frame c; template 3: frame d; media ids repeat across templates
    embs = np.array([[1, 0, 0], [3, 0, 0], [0, 2, 0], [0, 0, 5], [0, 1, 1]], np.float32)
    templates = np.array([7, 7, 7, 3, 3])
    medias = np.array([1, 1, 2, 2, 1])
    t = metrics.Templates(templates, medias)
    feats = t.features(embs, None, np.ones(5, np.float32), "N0D0F0")
    assert list(t.ids) == [3, 7]
    want7 = np.array([2.0, 2.0, 0.0]) / math.sqrt(8)          # mean(a, b) + c
    want3 = np.array([0.0, 1.0, 6.0]) / math.sqrt(37)         # d + e (different media)
    np.testing.assert_allclose(feats, [want3, want7], atol=1e-12)
    assert feats.dtype == np.float64
    np.testing.assert_array_equal(t.index([7, 3, 7]), [1, 0, 1])


def test_template_features_chunked_equals_loop(monkeypatch):
    rng = np.random.default_rng(1)
    n = 500
    templates, medias = rng.integers(0, 40, n), rng.integers(0, 60, n)
    embs, flips = rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32)
    scores = rng.uniform(0.5, 1, n).astype(np.float32)
    monkeypatch.setattr(metrics, "_CHUNK_ROWS", 64)
    got = metrics.Templates(templates, medias).features(embs, flips, scores, "N1D1F1")
    feats = metrics.image_features(embs, flips, scores, "N1D1F1").astype(np.float64)
    for row, tid in enumerate(np.unique(templates)):
        members = templates == tid
        total = sum(feats[members & (medias == m)].mean(0) for m in np.unique(medias[members]))
        np.testing.assert_allclose(got[row], total / np.linalg.norm(total), atol=1e-12)


# --------------------------------------------------------------------------------------------- 1:1
@pytest.mark.parametrize("dense", [True, False])
def test_pair_scores_gram_and_gather_paths(dense):
    rng = np.random.default_rng(2)
    a = metrics.normalise_rows(rng.normal(size=(300, 16)))
    b = metrics.normalise_rows(rng.normal(size=(300, 16)))
    n = 5000 if dense else 40
    i1, i2 = rng.integers(0, 300, n), rng.integers(0, 300, n)
    want = np.array([a[i] @ b[j] for i, j in zip(i1, i2)])
    np.testing.assert_allclose(metrics.pair_scores(a, b, i1, i2), want, atol=1e-12)
    order = np.argsort(i1, kind="stable")          # pairs sorted by the first template: the slice path
    np.testing.assert_array_equal(metrics.pair_scores(a, b, i1[order], i2[order]),
                                  metrics.pair_scores(a, b, i1, i2)[order])


def test_roc_is_exactly_sklearn_roc_curve_with_ties():
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(5, 2000))
        labels = (rng.random(n) < rng.uniform(0.05, 0.5)).astype(np.int8)
        labels[:2] = (1, 0)
        scores = rng.normal(size=n) + labels
        if trial % 2:
            scores = np.round(scores, 1)
        fpr, tpr, _ = roc_curve(labels, scores)
        got_fpr, got_tpr = metrics.roc(labels, scores)
        np.testing.assert_array_equal(got_fpr, fpr)
        np.testing.assert_array_equal(got_tpr, tpr)
    with pytest.raises(UserError):
        metrics.roc(np.ones(4), np.arange(4.0))


def test_roc_is_exactly_sklearn_roc_curve_with_few_distinct_scores():
    rng = np.random.default_rng(5)
    for trial in range(300):                      # 1–5 distinct values: every branch of the point dropping
        n = int(rng.integers(2, 40))
        labels = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(np.int8)
        labels[:2] = (1, 0)
        scores = rng.integers(0, 1 + trial % 5, n) * 0.5 + labels * (trial % 2)
        fpr, tpr, _ = roc_curve(labels, scores)
        got_fpr, got_tpr = metrics.roc(labels, scores)
        np.testing.assert_array_equal(got_fpr, fpr)
        np.testing.assert_array_equal(got_tpr, tpr)


def test_verification_auc_is_sklearn_auc_with_ties():
    from sklearn.metrics import auc

    rng = np.random.default_rng(4)
    for trial in range(10):
        labels = (rng.random(3000) < 0.2).astype(np.int8)
        scores = np.round(rng.normal(size=3000) + labels, 1 + trial % 3)
        fpr, tpr, _ = roc_curve(labels, scores)
        assert metrics.verification(labels, scores)[0]["AUC"] == auc(fpr, tpr)


def test_tar_at_far_reverse_argmin_rule_by_hand():
    fpr = np.array([0.0, 0.0, 1e-4, 1e-4, 0.015, 0.2, 1.0])
    tpr = np.array([0.0, 0.3, 0.4, 0.6, 0.7, 0.9, 1.0])
    got = metrics.tar_at_far(fpr, tpr)
    # 1e-6, 1e-5 → nearest fpr 0 (ties: largest tpr 0.3); 1e-4 → 0.6 (largest at that fpr);
    # 1e-3 → 1e-4 point (0.6); 1e-2 → 0.015 (0.005 away) → 0.7; 1e-1 → 0.015 (0.085 away, 0.2 is 0.1) → 0.7
    assert got == {"1e-6": 0.3, "1e-5": 0.3, "1e-4": 0.6, "1e-3": 0.6, "1e-2": 0.7, "1e-1": 0.7}


def test_verification_summary():
    labels = np.array([1, 1, 0, 0, 0, 1, 0, 0])
    scores = np.array([0.9, 0.4, 0.5, 0.1, 0.2, 0.8, 0.3, 0.45])
    summary, (fpr, tpr) = metrics.verification(labels, scores)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores)
    assert summary["AUC"] == pytest.approx(auc(ref_fpr, ref_tpr))
    assert summary["AUC"] == pytest.approx(13 / 15)  # 13 of the 15 genuine/impostor pairs ordered correctly
    assert set(summary["TAR@FAR"]) == set(metrics.FAR_KEYS)
    assert summary["TAR@FAR"]["1e-6"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------- 1:N
def _brute_force_1n(sims, gallery_subjects, probe_subjects, fpir):
    """Independent per-probe computation of top-k hits and TPIR at FPIR ``fpir`` (a Fraction)."""
    hits, mated_rows, impostor_best = {1: 0, 5: 0, 10: 0}, [], []
    for p in range(sims.shape[0]):
        row = sims[p]
        owners = [j for j in range(len(gallery_subjects)) if gallery_subjects[j] == probe_subjects[p]]
        if not owners:
            impostor_best.append(max(row))
            continue
        target = owners[0]
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rank = order.index(target)
        for k in hits:
            hits[k] += rank < k
        others = [row[j] for j in range(len(row)) if gallery_subjects[j] != probe_subjects[p]]
        mated_rows.append((row[target], max(others) if others else -np.inf))
    impostor_best.sort(reverse=True)
    n = len(impostor_best)
    threshold = impostor_best[max(math.floor(n * fpir) - 1, 0)] if n else -np.inf
    tpir = sum(s > other and s > threshold for s, other in mated_rows) / len(mated_rows)
    return hits, len(mated_rows), tpir


def _unit_rows_with_ties(rng, n, d=3):
    """Normalised rows on a coarse lattice, so that probe–gallery similarities tie often."""
    rows = rng.integers(-1, 2, size=(n, d)).astype(np.float64)
    rows[np.abs(rows).sum(1) == 0, 0] = 1
    return metrics.normalise_rows(rows)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_identification_matches_brute_force_with_ties(seed):
    from fractions import Fraction

    rng = np.random.default_rng(seed)
    gallery = _unit_rows_with_ties(rng, 15)
    gallery_subjects = rng.integers(0, 10, 15)          # some subjects have several gallery templates
    probes = _unit_rows_with_ties(rng, 60)
    probe_subjects = rng.integers(0, 14, 60)            # subjects 10..13 are never in the gallery
    sims = probes @ gallery.T
    summary, hits, curve = metrics.identification(sims, gallery_subjects, probe_subjects)
    for key in metrics.FPIR_KEYS:
        want_hits, num_mated, want_tpir = _brute_force_1n(sims, gallery_subjects, probe_subjects, Fraction(key))
        assert summary["TPIR@FPIR"][key] == pytest.approx(want_tpir, abs=1e-12)
    assert hits == want_hits
    assert summary["num_mated"] == num_mated
    assert summary["top1"] == pytest.approx(want_hits[1] / num_mated)
    assert curve.shape == metrics.CURVE_FPIR.shape


def test_tpir_threshold_rule_by_hand():
    # gallery: subjects 0 and 1, unit vectors e0, e1; probes given directly by their two similarities
    gallery = np.eye(2)
    gallery_subjects = np.array([0, 1])
    impostor_scores = np.linspace(0.9, 0.0, 10)            # 10 non-mated probes, best score listed
    mated = np.array([[0.95, 0.1], [0.85, 0.2], [0.5, 0.6], [0.05, 0.0]])  # subject 0: wins, wins, loses, wins
    probes = np.vstack([np.c_[impostor_scores, np.zeros(10)], mated])
    subjects = np.r_[np.full(10, 7), np.zeros(4, int)]
    summary, hits, _ = metrics.identification(probes @ gallery.T, gallery_subjects, subjects)
    # FPIR 1e-1: floor(10·0.1) − 1 = 0 → threshold 0.9 → only 0.95 passes → 1/4
    # FPIR 1e-2, 1e-3, 1e-4: index max(0 − 1, 0) = 0 → 0.9 → 1/4;  FPIR 1: index 9 → 0.0 → 0.95, 0.85, 0.05 → 3/4
    assert summary["TPIR@FPIR"] == {"1e-4": 0.25, "1e-3": 0.25, "1e-2": 0.25, "1e-1": 0.25, "1": 0.75}
    assert hits[1] == 3 and hits[5] == 4
    assert summary["num_nonmated"] == 10 and summary["num_mated"] == 4


def test_identification_report_overall_and_mixed():
    rng = np.random.default_rng(4)
    g1, g2 = _unit_rows_with_ties(rng, 6), _unit_rows_with_ties(rng, 5)
    s1, s2 = np.arange(6), np.arange(6, 11)
    probes = _unit_rows_with_ties(rng, 40)
    subjects = rng.integers(0, 11, 40)
    report, curves = metrics.identification_report({"G1": (g1, s1), "G2": (g2, s2)}, probes, subjects)
    r1, h1, _ = metrics.identification(probes @ g1.T, s1, subjects)
    r2, h2, _ = metrics.identification(probes @ g2.T, s2, subjects)
    rm, hm, _ = metrics.identification(probes @ np.vstack([g1, g2]).T, np.r_[s1, s2], subjects, fpir=False)
    for k in metrics.TOPK:
        assert report[f"top{k}"] == pytest.approx((h1[k] + h2[k]) / 40)
        assert report["mixed"][f"top{k}"] == pytest.approx(hm[k] / 40)
    for key in metrics.FPIR_KEYS:
        assert report["TPIR@FPIR"][key] == pytest.approx((r1["TPIR@FPIR"][key] + r2["TPIR@FPIR"][key]) / 2)
    assert report["G1"] == r1 and report["G2"] == r2
    np.testing.assert_allclose(curves["mean"], (curves["G1"] + curves["G2"]) / 2)
