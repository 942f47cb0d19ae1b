"""Backfill curves, flips, score calibration and multi-generation figures against hand computations."""
import json
import math
import os

import numpy as np
import pytest

from tools.compat_eval import backfill as bf
from tools.compat_eval import compat_eval as ce
from tools.compat_eval import protocol as cp
from tools.ijbc_eval import bootstrap
from utils.errors import UserError


def _clustered(rng, labels, d=8, spread=0.9):
    feats = rng.normal(size=(labels.max() + 1, d))[labels] + spread * rng.normal(size=(len(labels), d))
    return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(16), rng.integers(2, 6, 16))
    old, new = _clustered(rng, labels), _clustered(rng, labels)
    protocol = cp.Protocol(labels, impostors=400, nonmated_share=0.25, seed=0)
    return dict(labels=labels, old=old, new=new, protocol=protocol)


# -------------------------------------------------------------------------------------- the curve
def test_endpoints_equal_the_cross_test_and_the_new_self_test(case):
    p, old, new = case["protocol"], case["old"], case["new"]
    counts = bootstrap.subject_counts(16, 20, 0)
    entry = bf.backfill_curve(p, old, new, bf.random_order(16), counts)
    for position, gallery in ((0, old), (-1, new)):
        figures, reps = p.cell(new, gallery, counts)
        intervals = bootstrap.percentile_intervals(reps)
        for name in cp.METRICS:
            assert entry["metrics"][name][position] == figures[name]
            assert [entry["ci_low"][name][position], entry["ci_high"][name][position]] == intervals[name]
    assert entry["fractions"] == list(bf.FRACTIONS) and len(entry["negative_flips"]) == 11
    for key in bf.TOP1_FLIPS + bf.PAIR_FLIPS:
        assert len(entry[key]) == len(entry[f"{key}_ci_low"]) == len(entry[f"{key}_ci_high"]) == 11
    assert entry["negative_flips"][0] - 1e-12 <= entry["negative_flips_ci_high"][0]


def test_mixed_gallery_search_and_scores_against_brute_force(case):
    p, labels, old, new = case["protocol"], case["labels"], case["old"], case["new"]
    order = bf.random_order(16, seed=5)
    refreshed = bf.refreshed_identities(order, p, 0.5)
    scores, found = p.outcomes(new, bf.mixed_features(old, new, labels, refreshed))
    # brute force: every gallery-side image from the model of its identity's state
    side = [new[i] if refreshed[labels[i]] else old[i] for i in range(len(labels))]
    want = [float(side[a] @ new[b]) for a, b in zip(p.first, p.second)]
    np.testing.assert_allclose(scores, want, atol=1e-6)
    templates = {}
    for i in p.gallery_images:
        templates[labels[i]] = templates.get(labels[i], 0) + side[i]
    ids = sorted(templates)
    matrix = np.array([templates[c] / np.linalg.norm(templates[c]) for c in ids])
    mated = [i for i in p.probe_images if labels[i] in templates]
    ranks = [int(np.sum(matrix @ new[i] > matrix[ids.index(labels[i])] @ new[i] + 1e-7)) for i in mated]
    np.testing.assert_array_equal(found.rank, np.minimum(ranks, cp.SEARCH_DEPTH))
    nonmated = [i for i in p.probe_images if labels[i] not in templates]
    np.testing.assert_allclose(found.nonmated_best, [max(matrix @ new[i]) for i in nonmated], atol=1e-6)


@pytest.mark.parametrize("merge", bf.MERGES)
def test_mixed_outcomes_equal_the_per_fraction_evaluation(case, merge):
    """Scores of each space computed once give every state's pair scores and search as evaluating the
    mixed gallery itself (small blocks: several probe blocks)."""
    p, labels, old, new = case["protocol"], case["labels"], case["old"], case["new"]
    calibration = bf.Calibration(p, old, new) if merge == "calibrated" else None
    chains = [[bf.refreshed_identities(order, p, f) for f in bf.FRACTIONS]
              for order in (bf.random_order(16, 3), np.arange(16))]
    got = bf.mixed_outcomes(p, old, new, chains, calibration, block=30)
    for state, (scores, found) in zip(chains[0] + chains[1], got[0] + got[1]):
        want_scores, want = p.outcomes(new, bf.mixed_features(old, new, labels, state),
                                       None if calibration is None else calibration.at(state))
        np.testing.assert_array_equal(scores, want_scores)
        for field in ("mated", "rank", "correct"):
            np.testing.assert_array_equal(getattr(found, field), getattr(want, field))
        np.testing.assert_allclose(found.score, want.score, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(found.nonmated_best, want.nonmated_best, rtol=1e-6, atol=1e-6)
        assert p.figures(scores, found)[0] == p.figures(want_scores, want)[0]


def test_mixed_outcomes_with_exact_ties():
    """Features on a coarse grid (many equal scores, in both spaces): ranks, ties before the target and
    the correct flag equal the per-state evaluation; scores to the float32 rounding of a dot product."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(40), 3)
    old, new = (np.sign(rng.integers(-1, 2, (len(labels), 4))).astype(np.float32) + 0.0 for _ in range(2))
    old[:, 0] += 0.5
    new[:, 1] += 0.5                      # no zero rows
    p = cp.Protocol(labels, impostors=300, nonmated_share=0.2, seed=2)
    for calibration in (None, bf.Calibration(p, old, new)):
        chain = [bf.refreshed_identities(bf.random_order(40, 1), p, f) for f in bf.FRACTIONS]
        got = bf.mixed_outcomes(p, old, new, [chain], calibration, block=64)[0]
        for state, (scores, found) in zip(chain, got):
            want_scores, want = p.outcomes(new, bf.mixed_features(old, new, labels, state),
                                           None if calibration is None else calibration.at(state))
            np.testing.assert_array_equal(scores, want_scores)
            for field in ("mated", "rank", "correct"):
                np.testing.assert_array_equal(getattr(found, field), getattr(want, field))
            for field in ("score", "nonmated_best"):   # the search takes a target outside its top 8 from a dot
                np.testing.assert_allclose(getattr(found, field), getattr(want, field), atol=3e-7)   # product
    with pytest.raises(UserError, match="nested"):
        bf.mixed_outcomes(p, old, new, [chain[::-1]])


def test_curves_equal_the_per_fraction_loop(case):
    """backfill_curves (each space scored once) gives the figures, flips and intervals of the loop
    that evaluates the mixed gallery of every fraction."""
    p, labels, old, new = case["protocol"], case["labels"], case["old"], case["new"]
    counts = bootstrap.subject_counts(16, 10, 0)
    orders = {"random": bf.random_order(16), "reverse": np.arange(16)[::-1]}
    entries = bf.backfill_curves(p, old, new, orders, ["v1", "v2"], counts)
    assert [(e["order"], e["merge"]) for e in entries] == [(o, m) for o in orders for m in bf.MERGES]
    calibration = bf.Calibration(p, old, new)
    for e in entries:
        outcomes = [p.outcomes(new, bf.mixed_features(old, new, labels, state),
                               None if e["merge"] == "plain" else calibration.at(state))
                    for state in (bf.refreshed_identities(orders[e["order"]], p, f) for f in bf.FRACTIONS)]
        want = bf.backfill_curve(p, old, new, orders[e["order"]], counts, e["merge"], calibration=calibration,
                                 outcomes=outcomes)
        assert {k: v for k, v in e.items() if k not in ("order", "query", "gallery", "old", "fastfill")} == want


def test_fastfill_endpoints_equal_the_transformed_cross_test_and_the_new_self_test(case):
    """The FastFill setting: items not yet re-extracted are h(old); f = 0 is the cross-test against the
    transformed gallery, f = 1 the new self-test, a middle point the evaluation of its mixed gallery."""
    p, labels, old, new = case["protocol"], case["labels"], case["old"], case["new"]
    rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(8, 8)))[0].astype(np.float32)
    mapped = (0.5 * old @ rotation + 0.5 * new)
    mapped /= np.linalg.norm(mapped, axis=1, keepdims=True)
    counts = bootstrap.subject_counts(16, 10, 0)
    orders = {"random": bf.random_order(16), "reverse": np.arange(16)[::-1]}
    entries = bf.backfill_curves(p, old, new, orders, ["v1", "v2"], counts, gallery=mapped, gallery_name="v1 + h")
    cross, self_test, old_self = p.cell(new, mapped, counts), p.cell(new, new, counts), p.cell(old, old)[0]
    for e in entries:
        assert (e["query"], e["gallery"], e["old"], e["fastfill"]) == ("v2", "v1 + h", "v1", True)
        assert e["old_self"] == old_self
        if e["merge"] == "plain":
            for position, (figures, reps) in ((0, cross), (-1, self_test)):
                intervals = bootstrap.percentile_intervals(reps)
                for name in cp.METRICS:
                    assert e["metrics"][name][position] == figures[name]
                    assert [e["ci_low"][name][position], e["ci_high"][name][position]] == intervals[name]
        else:                 # one space at the ends: each probe's ranking as in the plain merge
            assert e["metrics"]["top1"][0] == cross[0]["top1"] and e["metrics"]["top1"][-1] == self_test[0]["top1"]
    state = bf.refreshed_identities(orders["reverse"], p, 0.4)
    calibration = bf.Calibration(p, mapped, new)
    for merge in bf.MERGES:
        scores, found = p.outcomes(new, bf.mixed_features(mapped, new, labels, state),
                                   None if merge == "plain" else calibration.at(state))
        middle = next(e for e in entries if (e["order"], e["merge"]) == ("reverse", merge))
        assert {name: middle["metrics"][name][4] for name in cp.METRICS} == p.figures(scores, found)[0]
    plain = bf.backfill_curves(p, old, new, orders, ["v1", "v2"], merges=("plain",))
    assert not plain[0]["fastfill"] and plain[0]["gallery"] == plain[0]["old"] == "v1"
    assert plain[0]["metrics"]["top1"][0] != entries[0]["metrics"]["top1"][0]    # the transformed gallery counts


def test_oracle_order_maximises_its_own_figure(case):
    """The oracle's gains against a pair-by-pair count; its right 1:1 decisions at the endpoint
    thresholds (its own figure) reach those of every other order at every fraction."""
    p, labels, old, new = case["protocol"], case["labels"], case["old"], case["new"]
    far = 0.05

    def right(gallery):                                    # pair by pair, the threshold by its definition
        scores = [float(gallery[a] @ new[b]) for a, b in zip(p.first, p.second)]
        impostor = sorted((s for s, g in zip(scores, p.genuine) if not g), reverse=True)
        threshold = impostor[max(math.floor(len(impostor) * far) - 1, 0)]
        return [(s > threshold) == g for s, g in zip(scores, p.genuine)]

    after, before = right(new), right(old)
    gain = [0] * 16
    for a, r_after, r_before in zip(p.first, after, before):
        gain[labels[a]] += int(r_after) - int(r_before)
    order = bf.oracle_order(p, old, new, far)
    assert [gain[c] for c in order] == sorted(gain, reverse=True)
    ties = bf.random_order(16)
    for high, low in zip(order[:-1], order[1:]):           # equal gains keep the random order
        if gain[high] == gain[low]:
            assert list(ties).index(high) < list(ties).index(low)

    def own_figure(order, fraction):
        state = bf.refreshed_identities(order, p, fraction)
        return sum(a_ if state[labels[a]] else b_ for a, a_, b_ in zip(p.first, after, before))

    rng = np.random.default_rng(0)
    others = [bf.random_order(16), np.arange(16), *(rng.permutation(16) for _ in range(30))]
    strictly = False
    for fraction in bf.FRACTIONS:
        best = own_figure(order, fraction)
        assert all(best >= own_figure(o, fraction) for o in others)
        strictly |= best > own_figure(others[0], fraction)
    assert strictly                                         # the case tells the orders apart


def test_refreshed_identities_take_the_share_of_each_gallery():
    protocol = cp.Protocol(np.repeat(np.arange(20), 3), impostors=50, nonmated_share=0.2, seed=1)
    order = bf.random_order(20, seed=2)
    for fraction, in_gallery, held_out in ((0, 0, 0), (0.5, 8, 2), (0.3, 5, 1), (1, 16, 4)):
        refreshed = bf.refreshed_identities(order, protocol, fraction)
        assert refreshed[protocol.mated_identities].sum() == in_gallery and refreshed.sum() == in_gallery + held_out
    first = bf.refreshed_identities(order, protocol, 0.3)
    assert (bf.refreshed_identities(order, protocol, 0.6) >= first).all()   # nested: items stay re-extracted


def test_area_is_the_normalised_trapezoid():
    assert bf.area([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)            # 0.25 + 0.5
    assert bf.area([0.2, 0.6], [0.5, 1]) == pytest.approx(0.75)              # 0.3 / 0.4
    np.testing.assert_allclose(bf.area([0, 1], [[0, 1], [1, 1]]), [0.5, 1])  # along the last axis


# --------------------------------------------------------------------------------------------- flips
def test_flips_by_hand():
    from tools.ijbc_eval.metrics import Search

    def ranks(r):
        return Search(np.ones(len(r), bool), np.array(r), None, None, None, 10)

    # right before: probes 0, 1; right after: 0, 2. Old error 2/4, new error 2/4
    flips = bf.top1_flips(ranks([0, 0, 3, 1]), ranks([0, 2, 0, 1]))
    assert flips == {"negative_flips": 0.25, "positive_flips": 0.25, "relative_negative_flips": 0.25 / (0.5 * 0.5)}
    weighted = bf.top1_flips(ranks([0, 0, 3, 1]), ranks([0, 2, 0, 1]), [0, 3, 1, 0])   # probe 1 thrice, probe 2 once
    assert weighted["negative_flips"] == 0.75 and weighted["positive_flips"] == 0.25
    assert weighted["relative_negative_flips"] == pytest.approx(0.75 / (0.75 * 0.75))
    genuine = np.array([True, True, False, False])
    # old threshold: the impostor score of rank floor(2·0.5) − 1 = 0, i.e. 0.5; new: 0.6 (accept: score above it)
    old, new = np.array([0.9, 0.2, 0.1, 0.5]), np.array([0.3, 0.8, 0.6, 0.05])
    np.testing.assert_array_equal(bf.decisions(genuine, old, 0.5), [True, False, True, True])
    np.testing.assert_array_equal(bf.decisions(genuine, new, 0.5), [False, True, True, True])
    figures, reps = bf.pair_flips(genuine, old, new, 0.5)
    # genuine: pair 0 accepted → rejected, pair 1 rejected → accepted; impostors: both rejected before and after
    assert figures == {"negative_flips_genuine": 0.5, "positive_flips_genuine": 0.5,
                       "negative_flips_impostor": 0.0, "positive_flips_impostor": 0.0} and reps is None


def test_pair_flips_each_kind_over_its_own_count():
    """Impostor pairs do not dilute the genuine pairs' flips; resampled thresholds follow the weights."""
    genuine = np.r_[True, True, np.zeros(98, bool)]
    old = np.r_[0.9, 0.1, np.linspace(0, 0.5, 98)]
    new = np.r_[0.2, 0.95, np.linspace(0, 0.5, 98)[::-1]]
    figures, _ = bf.pair_flips(genuine, old, new, 0.01)   # threshold: the top impostor (0.5) on both
    assert figures["negative_flips_genuine"] == 0.5 and figures["positive_flips_genuine"] == 0.5
    assert figures["negative_flips_impostor"] == 0.0 and figures["positive_flips_impostor"] == 0.0
    # a resample repeating impostor 97 (old 0.4948, new 0.0052) 50 times: n = 147, rank floor(1.47) − 1 = 0 → 0.5
    # on both sides; and one dropping the top old impostor (index 99: old 0.5 → threshold 0.4948)
    heavy, dropped = np.ones(100), np.ones(100)
    heavy[97], dropped[99] = 50, 0
    _, reps = bf.pair_flips(genuine, old, new, 0.01, [heavy, dropped])
    assert reps["negative_flips_impostor"][0] == 0.0
    # without old impostor 99 (new score 0): old threshold 0.4948, new still 0.5 (impostor 2) → no flip either
    assert reps["positive_flips_impostor"][1] == 0.0
    want = [bf.pair_flips(genuine[w > 0].repeat(w[w > 0].astype(int)), old[w > 0].repeat(w[w > 0].astype(int)),
                          new[w > 0].repeat(w[w > 0].astype(int)), 0.01)[0] for w in (heavy, dropped)]
    for key in bf.PAIR_FLIPS:
        np.testing.assert_allclose(reps[key], [w[key] for w in want])


def test_flips_close_the_top1_gap(case):
    """top1(updated) − top1(old system) = positive − negative flips, at every fraction."""
    p, old, new = case["protocol"], case["old"], case["new"]
    entry = bf.backfill_curve(p, old, new, bf.random_order(16))
    old_top1 = p.cell(old, old)[0]["top1"]
    for k in range(len(entry["fractions"])):
        assert entry["metrics"]["top1"][k] - old_top1 == pytest.approx(
            entry["positive_flips"][k] - entry["negative_flips"][k])


def _open_search(mated, score, correct, nonmated_best):
    from tools.ijbc_eval.metrics import Search

    mated = np.array(mated, bool)
    return Search(mated, np.zeros(mated.sum(), np.int64), np.array(score), np.array(correct, bool),
                  np.array(nonmated_best), 10)


def test_open_set_flips_by_hand():
    mated = [True, False, True, False, True, False, False]
    # FPIR 0.5 over 4 non-mated probes: the threshold is the non-mated best of rank floor(2) − 1 = 1 (0.5 before,
    # 0.7 after); identified = right subject first and score above it, alarm = best above it
    old = _open_search(mated, [0.6, 0.4, 0.9], [True, True, False], [0.9, 0.5, 0.3, 0.1])   # identified: 0; alarm: 0
    new = _open_search(mated, [0.6, 0.9, 0.95], [True, True, True], [0.2, 0.8, 0.7, 0.1])   # identified: 1, 2; alarm: 1
    assert bf.open_set_flips(old, new, 0.5) == {"negative_flips_open_mated": 1 / 3, "positive_flips_open_mated": 2 / 3,
                                                "negative_flips_open_nonmated": 0.25,
                                                "positive_flips_open_nonmated": 0.25}
    # mated probe 0 twice, non-mated probe 2 dropped: thresholds from 3 non-mated (rank floor(1.5) − 1 = 0: 0.9 before,
    # 0.8 after): identified before none, after mated 1 and 2 (2 of 4 mated probes); no alarm on either side
    weighted = bf.open_set_flips(old, new, 0.5, [2, 1, 1, 1, 1, 0, 1])
    assert weighted == {"negative_flips_open_mated": 0.0, "positive_flips_open_mated": 0.5,
                        "negative_flips_open_nonmated": 0.0, "positive_flips_open_nonmated": 0.0}


def test_open_set_flips_close_the_tpir_gap(case):
    """TPIR@FPIR=1e-1(updated) − TPIR@FPIR=1e-1(old system) = positive − negative open-set mated flips."""
    p, old, new = case["protocol"], case["old"], case["new"]
    entry = bf.backfill_curve(p, old, new, bf.random_order(16), counts=bootstrap.subject_counts(16, 5, 0))
    assert entry["flip_fpir"] == 0.1
    old_tpir = p.cell(old, old)[0]["TPIR@FPIR=1e-1"]
    for k in range(len(entry["fractions"])):
        assert entry["metrics"]["TPIR@FPIR=1e-1"][k] - old_tpir == pytest.approx(
            entry["positive_flips_open_mated"][k] - entry["negative_flips_open_mated"][k])
        for key in bf.OPEN_FLIPS:
            assert entry[f"{key}_ci_low"][k] <= entry[key][k] + 1e-12 or math.isnan(entry[f"{key}_ci_low"][k])


# ------------------------------------------------------------------------------------------- orders
def test_orders(tmp_path):
    assert sorted(bf.random_order(6, 1)) == list(range(6))
    np.testing.assert_array_equal(bf.random_order(6, 1), bf.random_order(6, 1))
    labels = np.array([0, 0, 1, 1, 2, 2])
    raw = np.array([[3.0, 0], [9, 0], [1, 0], [1, 0], [5, 0], [7, 0]])
    # identity 0 enrolled by image 0 (norm 3), 1 by image 2 (1); 2 has no gallery image: mean of 5 and 7
    np.testing.assert_array_equal(bf.norm_order(raw, labels, np.array([0, 2])), [1, 0, 2])
    path = tmp_path / "order.txt"
    path.write_text("bob\n\ncarl\n")
    order = bf.read_order(str(path), ["al", "bob", "carl", "dan"], seed=0)
    assert order[:2].tolist() == [1, 2] and sorted(order.tolist()) == [0, 1, 2, 3]
    for text, message in (("bob\neve\n", "line 2: unknown identity 'eve'"), ("bob\nbob\n", "line 2: identity 'bob'"),
                          ("\n", "lists no identity")):
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            bf.read_order(str(path), ["al", "bob", "carl", "dan"])


# -------------------------------------------------------------------------------------- calibration
def test_far_maps_are_monotone_and_equal_far_at_the_fit():
    rng = np.random.default_rng(0)
    spaces = [rng.normal(0.0, 0.1, 500), rng.normal(0.3, 0.05, 800)]      # two differently placed impostor scales
    maps = [bf.FarMap(s) for s in spaces]
    grid = np.linspace(-1, 1.5, 5001)
    for far_map in maps:
        assert (np.diff(far_map(grid)) > 0).all()
    for far in (0.5, 0.1, 0.01):
        level = -math.log10(far)
        shares = [np.mean(far_map(s) >= level - 1e-12) for far_map, s in zip(maps, spaces)]
        for share, s in zip(shares, spaces):
            assert abs(share - far) <= 1 / len(s)


def test_calibrated_merge_keeps_each_probes_ranking_at_the_endpoints(case):
    """With the whole gallery in one space every probe's scores go through one monotone map."""
    p, old, new = case["protocol"], case["old"], case["new"]
    plain = bf.backfill_curve(p, old, new, bf.random_order(16))
    calibration = bf.Calibration(p, old, new)
    calibrated = bf.backfill_curve(p, old, new, bf.random_order(16), merge="calibrated", calibration=calibration)
    for position in (0, -1):
        assert calibrated["metrics"]["top1"][position] == plain["metrics"]["top1"][position]
        assert calibrated["metrics"]["top5"][position] == plain["metrics"]["top5"][position]
    # cross-fitting: a fold's maps come from impostor pairs of the other fold's identities only
    labels = p.labels
    impostor = ~p.genuine
    for fold in (0, 1):
        fit = (calibration.fold[labels[p.first]] != fold) & (calibration.fold[labels[p.second]] != fold) & impostor
        want = bf.FarMap(np.einsum("ij,ij->i", new[p.first[fit]], new[p.second[fit]]).astype(np.float64))
        np.testing.assert_allclose(calibration.maps[fold, True].points, want.points, atol=1e-6)


# -------------------------------------------------------------------------------------- generations
def test_generation_figures_by_hand():
    m = np.array([[0.5, 0.1, 0.1], [0.6, 0.7, 0.2], [0.4, 0.8, 0.9]])     # rows: query, columns: gallery
    value = {(q, g): m[q, g] for q in range(3) for g in range(3)}
    reps = {key: np.array([v, v - 0.3 * (key == (1, 0))]) for key, v in value.items()}
    out = cp.generations_summary(["a", "b", "c"], value, reps)
    assert out["average_compatibility"] == pytest.approx(2 / 3)            # (1,0) and (2,1) of 3 pairs
    assert out["average_multimodel_accuracy"] == pytest.approx(3.9 / 6)
    assert out["oldest_compatible"] == {"a": "a", "b": "a", "c": "b"}
    assert out["average_compatibility_ci_low"] == pytest.approx(1 / 3 + 0.025 / 3)   # replicates 2/3 and 1/3
    assert out["average_multimodel_accuracy_ci_high"] < 3.9 / 6 + 1e-9


def test_oldest_compatible_needs_every_generation_between():
    """v3 reaches v1's self-test but not v2's: it is compatible back to itself only, not to v1."""
    m = np.array([[0.5, 0.0, 0.0], [0.6, 0.7, 0.0], [0.55, 0.65, 0.9]])
    value = {(q, g): m[q, g] for q in range(3) for g in range(3)}
    out = cp.generations_summary(["v1", "v2", "v3"], value)
    assert out["oldest_compatible"] == {"v1": "v1", "v2": "v1", "v3": "v3"}
    m[2, 1] = 0.7                                                             # now reaches v2 (≥) as well
    out = cp.generations_summary(["v1", "v2", "v3"], {(q, g): m[q, g] for q in range(3) for g in range(3)})
    assert out["oldest_compatible"]["v3"] == "v1"


# -------------------------------------------------------------------------------------- the command
def _saved(path, generations=3):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(12), 4)
    arrays = {}
    for g in range(generations):
        feats = _clustered(rng, labels, d=16) * rng.uniform(0.5, 2, (len(labels), 1)).astype(np.float32)
        arrays[f"embs{g}"], arrays[f"embs_f{g}"] = feats, feats
    np.savez(path, generations=np.array([f"v{g + 1}" for g in range(generations)]), labels=labels, **arrays)
    return str(path)


def test_command_writes_the_backfill_report(tmp_path):
    saved = _saved(tmp_path / "embs.npz")
    (tmp_path / "order.txt").write_text("11\n3\n")
    out = str(tmp_path / "out" / "r")
    result = ce.main(["--restore_embs", saved, "-R", out, "--bootstrap", "10", "--impostors", "300",
                      "--metric", "TAR@FAR=1e-1", "--backfill", "v1", "v3", "--backfill_order", str(tmp_path / "order.txt")])
    with open(out + ".json") as handle:
        saved_result = json.load(handle)
    entries = saved_result["backfill"]
    assert [(e["order"], e["merge"]) for e in entries] == [(o, m) for o in ("random", "norm", "oracle", "file")
                                                           for m in ("plain", "calibrated")]
    for e in entries:
        assert (e["query"], e["gallery"]) == ("v3", "v1") and len(e["metrics"]["TAR@FAR=1e-1"]) == 11
        for key in ("ci_low", "ci_high", "negative_flips", "positive_flips", "area"):
            assert key in e
    cross = next(c for c in result["cells"] if (c["query"], c["gallery"]) == ("v3", "v1"))
    assert entries[0]["metrics"]["top1"][0] == cross["top1"]
    for key in ("average_compatibility", "average_multimodel_accuracy"):
        assert {key, key + "_ci_low", key + "_ci_high"} <= set(saved_result)
    with open(out + ".md") as handle:
        text = handle.read()
    assert "Average Compatibility" in text and "Backfill of v1's gallery by v3 (order file, plain merge)" in text
    assert os.path.getsize(out + "_backfill.png") > 0
    with pytest.raises(UserError, match="--backfill: unknown generation 'v9'"):
        ce.main(["--restore_embs", saved, "-R", out, "--backfill", "v1", "v9"])


def test_command_draws_fastfill_curves_with_a_transform(tmp_path):
    """--backfill with --transform: the FastFill curves start at the transformed cell and end at the new self-test."""
    from tools.transform import transforms

    saved = _saved(tmp_path / "embs.npz")
    h = transforms.save(transforms.build("linear", 16, 16), str(tmp_path / "h.pt"))
    out = str(tmp_path / "r")
    result = ce.main(["--restore_embs", saved, "-R", out, "--bootstrap", "0", "--impostors", "300", "--metric",
                      "TAR@FAR=1e-1", "--backfill", "v1", "v3", "--transform", h, "--transform_generations", "v1", "v3",
                      "--backfill_merge", "plain"])
    fastfill = [e for e in result["backfill"] if e["fastfill"]]
    assert [e["order"] for e in fastfill] == ["random", "norm", "oracle"] and len(result["backfill"]) == 6
    cells = {(c["query"], c["gallery"]): c for c in result["cells"]}
    for e in fastfill:
        assert (e["query"], e["gallery"], e["old"]) == ("v3", "v1 + linear", "v1")
        for name in cp.METRICS:
            assert e["metrics"][name][0] == cells["v3", "v1 + linear"][name]
            assert e["metrics"][name][-1] == cells["v3", "v3"][name]
    with open(out + ".md") as handle:
        assert "FastFill: v1's gallery transformed (v1 + linear) until re-extracted by v3" in handle.read()


def test_figure_words():
    entry = {"query": "v3", "gallery": "v1 + linear", "old": "v1", "fastfill": True, "order": "oracle",
             "merge": "calibrated"}
    assert bf.curve_words(entry) == ("v3 queries, v1's gallery transformed (v1 + linear): oracle order (ground "
                                     "truth, upper reference), scores calibrated to one FAR scale")
    assert bf.metric_words("TAR@FAR=1e-4") == "TAR at FAR=1e-4 (1:1 verification)"
    assert bf.metric_words("top5") == "top-5 identification rate (1:N)"


def test_demo_backfill_on_ijb_style_images(tmp_path):
    from tools.demo import backfill as demo_bf
    from tools.synthetic import make_synthetic

    data = str(tmp_path / "data")
    make_synthetic.main(["--out", data, "--identities", "2", "--images-per-identity", "1", "--ijb-identities", "8",
                         "--workers", "0"])
    images, subjects = demo_bf.ijb_subjects(data)
    from tools.ijbc_eval.meta import load_meta

    count = len(load_meta(data).names)
    assert len(images) <= count and len(np.unique(subjects)) == 8
    rng = np.random.default_rng(0)
    _, labels = np.unique(subjects, return_inverse=True)
    paths = {}
    for name in ("old", "L2", "independent"):
        feats = np.zeros((count, 16), np.float32)
        feats[images] = _clustered(rng, labels, d=16, spread=0.5)
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], embs=feats, embs_f=feats)
    out = tmp_path / "out"
    out.mkdir()
    report = demo_bf.write_curves(data, paths["old"], {"L2": paths["L2"], "independent": paths["independent"]},
                                  str(out), resamples=5)
    assert [(e["query"], e["order"], e["merge"]) for e in report["backfill"]] == [
        (n, o, "plain") for n in ("L2", "independent") for o in ("random", "norm")]
    for suffix in ("json", "md", "png"):
        assert os.path.getsize(out / f"backfill.{suffix}") > 0
