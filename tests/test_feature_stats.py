"""utils/feature_stats.py and the feature-file naming of utils/old_features.py, on hand-computed cases."""
import math

import numpy as np
import pytest
from sklearn import preprocessing

from utils import feature_stats as fs
from utils.errors import UserError
from utils.old_features import sd_rec
from utils.scenarios import credible_kind, feature_path, parse_sd, scenario_of

# class 0: rows 0, 2 (raw [2,0], [0,3]); class 1: rows 1, 3; class 2: row 4 — labels interleaved
X = np.array([[2, 0], [0, 4], [0, 3], [0, 2], [3, 4]], dtype=np.float32)
Y = np.array([0, 1, 0, 1, 2])


def test_class_means_raw_and_normalised():
    means, counts = fs.class_means(X, Y)
    np.testing.assert_allclose(means, [[1, 1.5], [0, 3], [3, 4]], atol=1e-7)
    assert counts.tolist() == [2, 2, 1] and means.dtype == np.float32
    means, _ = fs.class_means(X, Y, normalize_inputs=True)
    np.testing.assert_allclose(means, [[0.5, 0.5], [0, 1], [0.6, 0.8]], atol=1e-7)


def test_class_prototypes_normalise_the_raw_mean():
    protos = fs.class_prototypes(X, Y)
    np.testing.assert_allclose(protos, [[1 / math.sqrt(3.25), 1.5 / math.sqrt(3.25)], [0, 1], [0.6, 0.8]], atol=1e-7)


def test_class_means_empty_class_and_prototype_error():
    means, counts = fs.class_means(X, Y, num_classes=4)
    assert counts[3] == 0 and not means[3].any()
    with pytest.raises(UserError, match="class 3"):
        fs.class_prototypes(X, Y, num_classes=4)


def _circle_case():
    """Class 0 (normalised): [1,0] twice (rows 2 and 5, raw lengths differ), [0,1], [.6,.8].

    Mean [.65, .45]; distances: [1,0] → √.325, [0,1] → √.725, [.6,.8] → √.125.
    Class 1: one image (row 1). Class 2: rows 0 and 3 at equal distance (a tie).
    """
    features = np.array([[0, 3], [7, 7], [5, 0], [0, -2], [0, 1], [2, 0], [3, 4]], dtype=np.float32)
    labels = np.array([2, 1, 0, 2, 0, 0, 0])
    return features, labels


@pytest.mark.parametrize("T, expected", [
    (0.5, [1, 1, 1, 0, 0, 0, 1]),     # class 0 keeps 2: [.6,.8] and the first [1,0]; class 2 keeps row 0
    (0.75, [1, 1, 1, 1, 0, 1, 1]),    # keeps 3 of class 0 (drops [0,1]); ceil(1.5) = 2 of class 2
    (1.0, [1, 1, 1, 1, 1, 1, 1]),
    (0.0, [0, 0, 0, 0, 0, 0, 0]),
    (0.1, [1, 1, 0, 0, 0, 0, 1]),     # ceil(0.4) = 1 per class of 4, ceil(0.1) = 1 for the single image
])
def test_credible_mask_hand_cases(T, expected):
    features, labels = _circle_case()
    mask = fs.credible_mask(features, labels, T)
    assert mask.dtype == np.uint8
    assert mask.tolist() == expected


@pytest.mark.parametrize("T, n, kept", [
    (0.07, 100, 8),     # 0.07 * 100 = 7.000000000000001 in float64, as the published math.ceil(T * n)
    (0.55, 100, 56),    # 0.55 * 100 = 55.00000000000001
    (0.7, 10, 7),       # 0.7 * 10 = 7.0 exactly
    (0.9, 10, 9),       # 0.9 * 10 = 9.0 exactly
    (0.5, 7, 4),
])
def test_credible_count_is_the_published_float_ceil(T, n, kept):
    assert math.ceil(T * n) == kept  # the published count, computed independently
    features = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    assert fs.credible_mask(features, np.zeros(n, int), T).sum() == kept


def _published_denoise(features, labels, T, column_norm):
    """Independent reference: scikit-learn normalisation, then a per-class loop."""
    data = preprocessing.normalize(features.astype(np.float64))
    if column_norm:
        data = preprocessing.normalize(data, axis=0)
    mask = np.zeros(len(labels), np.uint8)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        dist = np.linalg.norm(data[idx] - data[idx].mean(axis=0), axis=1)
        mask[idx[np.argsort(dist, kind="stable")[:math.ceil(T * len(idx))]]] = 1
    return mask


@pytest.mark.parametrize("column_norm", [False, True])
def test_credible_mask_matches_reference_unsorted_and_chunked(column_norm):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 40, 3000)
    features = (rng.standard_normal((40, 16)) * 3)[labels] + rng.standard_normal((3000, 16))
    features = (features * rng.uniform(0.5, 3, (1, 16))).astype(np.float32)  # columns of different scale
    expected = _published_denoise(features, labels, 0.8, column_norm)
    for chunk_rows in (None, 97):
        mask = fs.credible_mask(features, labels, 0.8, column_norm=column_norm, chunk_rows=chunk_rows)
        assert np.array_equal(mask, expected)


def test_column_scale_is_unit_column_norm():
    features = np.array([[3, 4], [1, 0], [0, 2]], dtype=np.float32)
    rows = np.array([[0.6, 0.8], [1, 0], [0, 1]])
    expected = 1 / np.linalg.norm(rows, axis=0)
    np.testing.assert_allclose(fs.column_scale(features), expected, rtol=1e-6)


def test_nccl_scores_entropy_threshold():
    logits = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]])
    assert fs.nccl_credible_mask(logits).tolist() == [0, 1, 0]        # log 2 vs log(2)/2
    probs = np.array([[0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3], [0.25] * 4, [1, 0, 0, 0]])
    # H = -(.9 ln .9 + .1 ln(.1/3)) = 0.4349 < ln(4)/2 = 0.6931; uniform H = ln 4
    assert fs.nccl_credible_mask(probs, probs=True).tolist() == [1, 0, 1]
    assert fs.nccl_credible_mask(np.log(probs[:2]), chunk_rows=1).tolist() == [1, 0]


def test_nccl_feature_mask_against_direct_formula():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(6), [5, 1, 8, 3, 6, 7])
    rng.shuffle(labels)
    features = (rng.standard_normal((6, 8)) * 0.2)[labels] + rng.standard_normal((len(labels), 8))
    features = features.astype(np.float32)
    data = preprocessing.normalize(features.astype(np.float64))
    centres = np.stack([data[labels == c].mean(axis=0) for c in range(6)])
    expected = []
    for i, x in enumerate(data):
        own = data[labels == labels[i]]
        var = np.var(np.linalg.norm(own - centres[labels[i]], axis=1)) + 1e-10
        logits = -np.linalg.norm(x - centres, axis=1) / var
        p = np.exp(logits - logits.max())
        p /= p.sum()
        expected.append(int(-(p[p > 0] * np.log(p[p > 0])).sum() <= np.log(6) / 2))
    mask = fs.nccl_feature_credible_mask(features, labels, chunk_rows=5)
    assert mask.tolist() == expected and 0 < mask.sum() < len(mask)


def test_advbct_hand_case():
    features = np.array([
        [1, 0], [2, 0], [-1, 0], [1, 0], [3, 0],     # class 0: distances .4 ×4 and 1.6 (outlier)
        [1, 0], [0, 5], [4, 0],                      # class 1: ≥ 3 members, no filtering
        [0, 9],                                      # class 2: one member
    ], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2])
    order = np.array([4, 8, 0, 6, 2, 5, 1, 3, 7])    # unsorted input
    stats = fs.advbct_class_stats(features[order], labels[order], num_classes=4)
    np.testing.assert_allclose(stats.centres, [[0.6, 0], [2 / 3, 1 / 3], [0, 1], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(stats.radii, [0.4, math.sqrt(8) / 3, 0, 0], atol=1e-6)
    assert stats.counts.tolist() == [5, 3, 1, 0]
    assert stats.num_radii.tolist() == [4, 3, 1, 0]
    assert stats.valid.tolist() == [True, True, False, False]


def test_advbct_published_quartiles():
    # one class of 9 around a direction v, row 0 opposite (an outlier); q1 = s[9//4], q3 = s[27//4]
    rng = np.random.default_rng(3)
    v = np.array([1.0, 2.0, 2.0])
    features = (v + 0.3 * rng.standard_normal((9, 3))).astype(np.float32)
    features[0] = -v
    labels = np.zeros(9, int)
    stats = fs.advbct_class_stats(features, labels)
    data = preprocessing.normalize(features.astype(np.float64))
    dist = np.sort(np.linalg.norm(data - data.mean(axis=0), axis=1))
    q1, q3 = dist[2], dist[6]
    kept = dist[(dist >= q1 - 1.5 * (q3 - q1)) & (dist <= q3 + 1.5 * (q3 - q1))]
    assert stats.num_radii[0] == len(kept) == 8
    assert stats.radii[0] == pytest.approx(kept.max(), abs=1e-6)


@pytest.mark.parametrize("features, labels, message", [
    (np.zeros((3, 2), np.float32), np.zeros(4, int), "3 rows but labels have 4"),
    (np.zeros(3, np.float32), np.zeros(3, int), "2-D float"),
    (np.zeros((3, 2), np.int64), np.zeros(3, int), "2-D float"),
    (np.zeros((3, 2), np.float32), np.zeros(3, float), "integer"),
    (np.zeros((0, 2), np.float32), np.zeros(0, int), "empty"),
    (np.zeros((3, 2), np.float32), np.array([0, -1, 0]), "row 1 has label -1"),
    (np.array([[1, 2], [np.nan, 0], [np.inf, 1]], np.float32), np.zeros(3, int), "row 1 contains NaN"),
    (np.array([[1, 2], [1, 0], [-np.inf, 1]], np.float32), np.zeros(3, int), "row 2 contains NaN or inf"),
])
def test_bad_inputs(features, labels, message):
    for call in (lambda: fs.class_means(features, labels), lambda: fs.credible_mask(features, labels, 0.9),
                 lambda: fs.credible_mask(features, labels, 0.9, column_norm=True),
                 lambda: fs.advbct_class_stats(features, labels)):
        with pytest.raises(UserError, match=message):
            call()


def test_bad_values():
    with pytest.raises(UserError, match="num_classes is 2"):
        fs.class_means(X, Y, num_classes=2)
    for T in (1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match="T must be in"):
            fs.credible_mask(X, Y, T)
    with pytest.raises(UserError, match="N×C"):
        fs.nccl_credible_mask(np.zeros(3))
    with pytest.raises(UserError, match="at least 2 classes"):
        fs.nccl_feature_credible_mask(X, np.zeros(5, int))
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(UserError, match="row 3 contains NaN"):
        fs.nccl_feature_credible_mask(bad, Y)
    with pytest.raises(UserError, match="row 1 contains NaN"):
        fs.nccl_credible_mask(np.array([[0.0, 1.0], [np.nan, 0.0]]))


def test_feature_naming():
    sd = "f128_r18_softmax_class70"
    assert parse_sd(sd) == (128, "class70")
    assert [scenario_of(f"f8_r18_arc_{s}") for s in ("class70", "class30", "data70", "data30", "class100", "data100")] \
        == ["OPclass", "OPclass", "OPdata", "OPdata", "EXclass", "EXdata"]
    assert feature_path(sd, "feature").endswith("feature_save/OPclass/f128_r18_softmax_class70_feature.npy")
    assert feature_path(sd, "label", "/x").endswith("/x/f128_r18_softmax_class70_label.npy")
    assert feature_path(sd, "avg_feature", "/x") == "/x/f128_r18_softmax_class70_avg_feature.npy"
    assert credible_kind(0.9) == "credible_ratio_90" and credible_kind(0.3) == "credible_ratio_30"
    assert feature_path(sd, credible_kind(0.95), "/x") == "/x/f128_r18_softmax_class70_credible_ratio_95_feature.npy"
    assert sd_rec("/d/train_part_30_class", sd) == "/d/train_part_70_class"
    assert sd_rec("/d/train_part_30_data", "f8_r18_arc_data100") == "/d/train"
    assert parse_sd("128_r18_softmax_class70") == (None, "class70")  # any name before the split, as published
    for bad in ("f128_r18_softmax_class50", "f128_class", "f128_../x_class70"):
        with pytest.raises(UserError, match="--SD"):
            parse_sd(bad)
    with pytest.raises(UserError, match="kind"):
        feature_path(sd, "mask")
