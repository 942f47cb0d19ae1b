"""Subject bootstrap: weighted recomputation equals recomputing on materialised resampled copies."""
import numpy as np
import pytest

from tools.ijbc_eval import bootstrap, metrics


def _draws(num_subjects, num_resamples, seed):
    """The subjects drawn in each resample, as subject_counts draws them."""
    return np.random.default_rng(seed).integers(0, num_subjects, (num_resamples, num_subjects))


def test_counts_are_the_draws_and_depend_only_on_the_seed():
    counts = bootstrap.subject_counts(7, 5, seed=3)
    want = np.stack([np.bincount(d, minlength=7) for d in _draws(7, 5, 3)])
    np.testing.assert_array_equal(counts, want)
    assert (counts.sum(1) == 7).all()
    np.testing.assert_array_equal(counts, bootstrap.subject_counts(7, 5, seed=3))
    assert not np.array_equal(counts, bootstrap.subject_counts(7, 5, seed=4))


def test_subject_index_is_joint():
    num, (a, b) = bootstrap.subject_index(np.array(["x", "z"]), np.array(["z", "y", "x"]))
    assert num == 3 and a.tolist() == [0, 2] and b.tolist() == [2, 1, 0]


def _pairs(rng, num_subjects=6, templates_per_subject=3):
    """All template pairs of a small set: subjects, labels and tied-heavy scores."""
    subject_of = np.repeat(np.arange(num_subjects), templates_per_subject)
    t1, t2 = np.triu_indices(len(subject_of), 1)
    labels = (subject_of[t1] == subject_of[t2]).astype(int)
    scores = np.round(rng.normal(labels * 1.2, 1.0), 1)
    return subject_of, t1, t2, labels, scores


@pytest.mark.parametrize("seed", [0, 1])
def test_verification_replicates_equal_materialised_resamples(seed):
    rng = np.random.default_rng(seed)
    subject_of, t1, t2, labels, scores = _pairs(rng)
    s1, s2 = subject_of[t1], subject_of[t2]
    counts = bootstrap.subject_counts(6, 8, seed)
    reps = bootstrap.verification_replicates(labels, scores, s1, s2, counts)
    for b, drawn in enumerate(_draws(6, 8, seed)):
        # copies: copy i of subject a and copy j of subject b carry the original pairs between a and b
        keep = [p for i, a in enumerate(drawn) for j, c in enumerate(drawn)
                for p in np.flatnonzero((s1 == a) & (s2 == c)) if (a != c or i == j)]
        if labels[keep].min() == labels[keep].max():
            assert np.isnan(reps["AUC"][b])
            continue
        want = metrics.verification(labels[keep], scores[keep])[0]
        assert reps["AUC"][b] == pytest.approx(want["AUC"], abs=1e-12)
        for key in metrics.FAR_KEYS:
            assert reps["TAR@FAR"][key][b] == pytest.approx(want["TAR@FAR"][key], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_identification_replicates_equal_materialised_resamples(seed):
    rng = np.random.default_rng(seed)
    gallery_subjects = np.array([0, 1, 2, 3, 1])
    probe_subjects = rng.integers(0, 8, 30)              # subjects 4–7 are non-mated
    sims = np.round(rng.normal(size=(30, 5)), 1)         # ties on purpose
    num, (probe_index,) = bootstrap.subject_index(probe_subjects)
    counts = bootstrap.subject_counts(num, 6, seed)
    search = metrics.search(sims, gallery_subjects, probe_subjects)
    reps = bootstrap.identification_replicates(search, probe_index, counts)
    labels = np.unique(probe_subjects)
    for b, drawn in enumerate(_draws(num, 6, seed)):
        rows = np.concatenate([np.flatnonzero(probe_subjects == labels[s]) for s in drawn])
        want = metrics.identification(sims[rows], gallery_subjects, probe_subjects[rows])[0]
        for key in ("top1", "top5"):
            np.testing.assert_equal(reps[key][b], want[key])
        for key in metrics.FPIR_KEYS:
            np.testing.assert_equal(reps["TPIR@FPIR"][key][b], want["TPIR@FPIR"][key])


def test_unit_weights_reproduce_the_plain_figures():
    rng = np.random.default_rng(5)
    _, _, _, labels, scores = _pairs(rng)
    plain = metrics.verification(labels, scores)[0]
    assert metrics.verification(labels, scores, np.ones(len(labels), int))[0] == plain


def test_percentile_intervals_and_differences():
    reps = {"a": np.arange(101.0), "b": {"c": np.r_[np.full(10, np.nan), np.ones(5)]}}
    got = bootstrap.percentile_intervals(reps)
    assert got["a"] == pytest.approx([2.5, 97.5]) and got["b"] == {"c": [1.0, 1.0]}
    diff = bootstrap.difference(reps, reps)
    assert (diff["a"] == 0).all()
    assert bootstrap.percentile_intervals(reps, level=0.5)["a"] == pytest.approx([25.0, 75.0])
