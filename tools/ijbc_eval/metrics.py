"""IJB metrics (protocol: docs/evaluation.md): image → template features, 1:1 verification, 1:N identification.

Everything is vectorised: templates are one sparse (templates × images) product, 1:1 scores are
blocks of a template Gram matrix (or chunked gathers when pairs are sparse), 1:N ranks and
thresholds are array operations on the probe × gallery similarity matrix. Template features and
scores are float64, as in the insightface evaluation code.
"""
import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import scipy.sparse
from utils.errors import UserError

FAR_KEYS = ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")
FPIR_KEYS = ("1e-4", "1e-3", "1e-2", "1e-1", "1")
TOPK = (1, 5, 10)
VARIANTS = tuple(f"N{n}D{d}F{f}" for n in (0, 1) for d in (0, 1) for f in (0, 1))
DEFAULT_VARIANT = "N0D1F1"
CURVE_FPIR = np.logspace(-4, 0, 41)
_CHUNK_ROWS = 1 << 16
_SMALL_ROWS = 1 << 12
_BLOCK_BYTES = 1 << 27


def variant_flags(variant):
    """``"N0D1F1"`` → (normalise, detector score, flip) booleans."""
    if variant not in VARIANTS:
        raise UserError(f"unknown variant '{variant}' (expected one of {', '.join(VARIANTS)})")
    return variant[1] == "1", variant[3] == "1", variant[5] == "1"


def image_features(embs, embs_f, scores, variant=DEFAULT_VARIANT):
    """float32 image features: (flip sum) → (L2-normalised) → (× detector score), per ``variant``."""
    normalise, detector, flip = variant_flags(variant)
    feats = np.asarray(embs, np.float32)
    if flip:
        feats = feats + np.asarray(embs_f, np.float32)
    if normalise:
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        feats = feats / np.where(norms > 0, norms, 1)
    if detector:
        feats = feats * np.asarray(scores, np.float32)[:, None]
    return feats


def unique(values, return_inverse=False, return_counts=False, presorted=False):
    """``np.unique`` of a 1-d array by one sort, with the same outputs (NaN-free input).

    numpy ≥ 2.3 takes a hash path for plain ``np.unique`` on integers, several times slower than
    a sort at millions of values; this keeps the metrics on the sort path whatever numpy picks.
    ``presorted``: ``values`` are already ascending (no sort at all).
    """
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="stable") if return_inverse and not presorted else None
    ordered = values if presorted else values[order] if order is not None else np.sort(values)
    first = np.ones(len(ordered), bool)
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    out = [ordered[first]]
    if return_inverse:
        rank = np.cumsum(first) - 1
        if order is not None:
            out.append(np.empty_like(rank))
            out[-1][order] = rank
        else:
            out.append(rank)
    if return_counts:
        out.append(np.diff(np.r_[np.flatnonzero(first), len(ordered)]))
    return out[0] if len(out) == 1 else tuple(out)


class Templates:
    """Template aggregation as one sparse matrix: weight of an image = 1 / frames of its media.

    ``ids`` are the sorted template ids (rows); a template feature is the sum over its media of the
    media's mean image feature, L2-normalised.
    """

    def __init__(self, templates, medias):
        templates, medias = np.asarray(templates), np.asarray(medias)
        self.ids, row = unique(templates, return_inverse=True)
        _, media = unique(medias, return_inverse=True)
        _, group, counts = unique(row.astype(np.int64) * (media.max() + 1) + media,
                                  return_inverse=True, return_counts=True)
        weights = 1.0 / counts[group]
        self.matrix = scipy.sparse.csc_matrix((weights, (row, np.arange(len(row)))),
                                              shape=(len(self.ids), len(row)))
        self._table = None
        if len(self.ids) and self.ids[0] >= 0 and self.ids[-1] < 8 * len(self.ids) + (1 << 20):
            self._table = np.zeros(self.ids[-1] + 1, np.int64)
            self._table[self.ids] = np.arange(len(self.ids))

    def index(self, ids):
        """Row of each template id (ids must be known): a table lookup for compact ids, else a search."""
        ids = np.asarray(ids)
        if self._table is not None and ids.size and ids.min() >= 0 and ids.max() < len(self._table):
            return self._table[ids]
        return np.searchsorted(self.ids, ids)

    def features(self, embs, embs_f, scores, variant=DEFAULT_VARIANT):
        """L2-normalised float64 template features (len(ids) × d), streamed over image chunks."""
        num_images = self.matrix.shape[1]
        if len(embs) != num_images or (embs_f is not None and len(embs_f) != num_images):
            raise UserError(f"embeddings hold {len(embs)} rows, the image list has {num_images} images")
        out = np.zeros((len(self.ids), embs.shape[1]), np.float64)
        feats = np.empty((min(_CHUNK_ROWS, num_images), embs.shape[1]), np.float64)
        for start in range(0, num_images, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, num_images)
            for low in range(start, stop, _SMALL_ROWS):   # float32 image features in cache-sized pieces
                part = slice(low, min(low + _SMALL_ROWS, stop))
                feats[low - start:part.stop - start] = image_features(
                    embs[part], None if embs_f is None else embs_f[part], scores[part], variant)
            weights = self.matrix[:, start:stop]
            if weights.nnz:   # only the templates of these images (a narrow band when images come by template)
                low, high = int(weights.indices.min()), int(weights.indices.max()) + 1
                out[low:high] += weights[low:high] @ feats[:stop - start]
        return normalise_rows(out)


def normalise_rows(x):
    """Rows divided by their L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def _compact(index, size):
    """``(used, position)``: the sorted distinct values of ``index`` (< ``size``) and each entry's rank among them."""
    present = np.bincount(index, minlength=size) > 0
    return np.flatnonzero(present), (np.cumsum(present) - 1)[index]


def pair_scores(feats1, feats2, idx1, idx2):
    """Cosine score ``feats1[idx1[i]] · feats2[idx2[i]]`` of every pair (rows already normalised).

    Computed as row blocks of the Gram matrix of the templates that occur (gathering just the
    needed entries) when the pairs cover at least 1/64 of that grid, else as chunked row gathers.
    Pairs are bucketed by row block: slices when they come sorted by ``idx1`` (as IJB pair files
    are), else a counting sort, so no pass is longer than linear.
    """
    idx1, idx2 = np.asarray(idx1, np.int64), np.asarray(idx2, np.int64)
    scores = np.empty(len(idx1), np.float64)
    rows, r1 = _compact(idx1, len(feats1))
    cols, c2 = _compact(idx2, len(feats2))
    if len(rows) * len(cols) > 64 * len(idx1):
        for start in range(0, len(idx1), _CHUNK_ROWS):
            part = slice(start, start + _CHUNK_ROWS)
            scores[part] = np.einsum("ij,ij->i", feats1[idx1[part]], feats2[idx2[part]])
        return scores
    right = np.ascontiguousarray(feats2[cols].T)
    step = max(1, _BLOCK_BYTES // (8 * len(cols)))
    num_blocks = -(-len(rows) // step)
    order = None
    if not np.all(r1[1:] >= r1[:-1]):   # pairs not sorted by their first template (IJB's files are)
        block = r1 // step
        order = np.argsort(block.astype(np.uint16) if num_blocks <= 1 << 16 else block, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(block, minlength=num_blocks))]
    else:
        bounds = np.searchsorted(r1, np.arange(num_blocks + 1) * step)
    for b in range(num_blocks):
        sel = slice(bounds[b], bounds[b + 1]) if order is None else order[bounds[b]:bounds[b + 1]]
        if bounds[b + 1] > bounds[b]:
            first = b * step
            gram = feats1[rows[first:first + step]] @ right
            scores[sel] = gram.ravel()[(r1[sel] - first) * len(cols) + c2[sel]]
    return scores


def roc(labels, scores, weights=None):
    """``(fpr, tpr)`` exactly as sklearn ``roc_curve(labels, scores)`` (with ``drop_intermediate``).

    The ROC only depends on how many scores, and how many genuine ones, are ≥ each distinct score,
    so it is read off one value sort of the scores (no argsort). sklearn keeps the first and last
    points and every point where the step to the next one differs, in false or true accepts; the
    step at a distinct value is (its count − its genuine count, its genuine count), so a point is
    kept where the count of its value differs from the next lower value's, or where one of the two
    holds genuine scores (only the few values with genuine scores need a closer look). Counts are
    exact integers, divided in float64 as sklearn does.

    ``weights``: integer multiplicity of each pair (a bootstrap resample); the curve is the one of
    the pairs repeated that many times (pairs of weight 0 left out), computed by sklearn.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    if weights is not None:
        from sklearn.metrics import roc_curve  # imported here: sklearn is slow to import

        kept = np.asarray(weights) > 0
        labels, scores, weights = labels[kept], scores[kept], np.asarray(weights, np.float64)[kept]
        num_pos = weights[labels].sum()
        if num_pos == 0 or num_pos == weights.sum():
            raise UserError("1:1 evaluation needs both genuine (label 1) and impostor (label 0) pairs")
        fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights)
        return fpr, tpr
    num_pos = int(labels.sum())
    if num_pos == 0 or num_pos == len(labels):
        raise UserError("1:1 evaluation needs both genuine (label 1) and impostor (label 0) pairs")
    ordered = np.sort(scores)
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]      # distinct values, ascending
    last = len(starts) - 1
    genuine = np.sort(scores[labels])
    if last >= 2:
        kept = []
        if len(starts) < len(ordered):   # ties: interior a where count(a) ≠ count(a−1)
            counts = np.diff(np.r_[starts, len(ordered)])
            kept.append(np.flatnonzero(counts[1:last] != counts[:last - 1]) + 1)
        value, num = unique(np.searchsorted(starts, np.searchsorted(ordered, genuine)), return_counts=True,
                            presorted=True)                                # genuine is sorted, so is this
        near = unique(np.r_[value, value + 1])
        near = near[(near >= 1) & (near < last)]

        def genuine_at(a):
            pos = np.minimum(np.searchsorted(value, a), len(value) - 1)
            return np.where(value[pos] == a, num[pos], 0)

        kept.append(near[genuine_at(near) != genuine_at(near - 1)])
        keep = unique(np.concatenate([[0, last], *kept]))[::-1]                # high to low
    else:
        keep = np.arange(last, -1, -1)
    tps = num_pos - np.searchsorted(genuine, ordered[starts[keep]], "left")      # genuine scores ≥ the value
    fps = (len(ordered) - starts[keep]) - tps                                  # all scores ≥ it, minus those
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps].astype(np.float64)
    return fps / fps[-1], tps / tps[-1]


def auc(fpr, tpr):
    """Area under the ROC (trapezoids over increasing ``fpr``), as sklearn ``auc``."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return float(trapezoid(tpr, fpr))


def tar_at_far(fpr, tpr, keys=FAR_KEYS):
    """TAR at each FAR: reverse the arrays, take tpr at argmin |fpr − FAR| (largest tpr on ties)."""
    fpr_r, tpr_r = fpr[::-1], tpr[::-1]
    return {key: float(tpr_r[np.argmin(np.abs(fpr_r - float(key)))]) for key in keys}


def verification(labels, scores, weights=None):
    """``{"TAR@FAR": {...}, "AUC": …}`` and the ROC ``(fpr, tpr)`` (``weights``: see :func:`roc`)."""
    fpr, tpr = roc(labels, scores, weights)
    return {"TAR@FAR": tar_at_far(fpr, tpr), "AUC": auc(fpr, tpr)}, (fpr, tpr)


def _threshold(sorted_desc, fraction, cumulative):
    """FPIR threshold: sorted[max(floor(n·f) − 1, 0)] (−inf without non-mated probes), taken in the
    list where each score is repeated as often as its weight (``cumulative``: running total of the weights)."""
    n = int(cumulative[-1]) if len(cumulative) else 0
    if n == 0:
        return -np.inf
    return sorted_desc[np.searchsorted(cumulative, max(math.floor(n * fraction) - 1, 0), "right")]


class GalleryIndex(NamedTuple):
    """What :func:`search` needs of a gallery's subjects alone, computed once per gallery."""
    subjects: np.ndarray   # distinct subjects, sorted
    first: np.ndarray      # each subject's first gallery column
    order: np.ndarray      # gallery columns sorted by subject (stable)
    ordered: np.ndarray    # the subjects in that order


def gallery_index(gallery_subjects):
    """The :class:`GalleryIndex` of ``gallery_subjects`` (one subject per gallery column)."""
    subjects, first = np.unique(gallery_subjects, return_index=True)
    order = np.argsort(gallery_subjects, kind="stable")
    return GalleryIndex(subjects, first, order, np.asarray(gallery_subjects)[order])


def _subject_columns(index, subjects):
    """``(row, column)`` of every gallery column (of :class:`GalleryIndex` ``index``) whose subject is ``subjects[row]``."""
    order, ordered = index.order, index.ordered
    low, high = np.searchsorted(ordered, subjects, "left"), np.searchsorted(ordered, subjects, "right")
    row = np.repeat(np.arange(len(subjects)), high - low)
    offset = np.arange(len(row)) - np.repeat(np.cumsum(high - low) - (high - low), high - low)
    return row, order[np.repeat(low, high - low) + offset]


class Search(NamedTuple):
    """Per-probe outcome of a 1:N search (:func:`search`), from which every 1:N figure is counted."""
    mated: np.ndarray          # bool per probe: its subject is in the gallery
    rank: np.ndarray           # per mated probe: place of its target in the sorted gallery
    score: np.ndarray          # per mated probe: similarity to its target
    correct: np.ndarray        # per mated probe: target above every other subject's score (None without fpir)
    nonmated_best: np.ndarray  # per non-mated probe: its best similarity (None without fpir)
    num_gallery: int


def search(sims, gallery_subjects, probe_subjects, fpir=True, index=None):
    """:class:`Search` outcomes from ``sims`` (probes × gallery cosine similarities).

    ``index``: :func:`gallery_index` of ``gallery_subjects``, when the caller searches the same
    gallery in several blocks of probes (computed here otherwise).

    A probe is mated when its subject has a gallery template; its target is the subject's first
    gallery template. Rank = place of the target when the gallery is sorted by decreasing
    similarity, ties kept in gallery order. ``correct``: the target score is above every other
    subject's score (the TPIR condition besides the threshold). Ranks, ties and the other-subject
    test are counted without copying ``sims``.
    """
    if sims.shape[1] == 0:
        raise UserError("1:N evaluation: empty gallery")
    index = gallery_index(gallery_subjects) if index is None else index
    subjects, first = index.subjects, index.first
    pos = np.minimum(np.searchsorted(subjects, probe_subjects), len(subjects) - 1)
    mated = subjects[pos] == probe_subjects
    target = first[pos[mated]]
    rows = np.flatnonzero(mated)
    score = sims[rows, target]
    row_score = np.full(len(sims), np.inf)                # non-mated rows: nothing is above or equal
    row_score[rows] = score
    above = np.count_nonzero(sims > row_score[:, None], axis=1)[rows]
    tie_row, tie_col = np.nonzero(sims == row_score[:, None])      # few: the targets and exact ties
    tie_row = np.searchsorted(rows, tie_row)
    rank = above + np.bincount(tie_row[tie_col < target[tie_row]], minlength=len(rows))
    correct = nonmated_best = None
    if fpir:
        # correct: no other subject's score ≥ the target's = entries ≥ it (above + ties) all of the probe's subject
        row, col = _subject_columns(index, probe_subjects[mated])
        own = np.bincount(row[sims[rows[row], col] >= score[row]], minlength=len(rows))
        correct = above + np.bincount(tie_row, minlength=len(rows)) == own
        nonmated_best = sims[~mated].max(1, initial=-np.inf)
    return Search(mated, rank, score, correct, nonmated_best, int(sims.shape[1]))


def search_summary(result, ks=TOPK, weights=None):
    """(summary dict, top-k hit counts, TPIR curve on ``CURVE_FPIR``) of a :class:`Search`.

    Top-k = share of mated probes whose target ranks below k. TPIR@FPIR f: share of mated probes
    that are ``correct`` and score above the threshold from the non-mated probes' best scores
    (:func:`_threshold`). ``weights``: integer multiplicity of each probe (a bootstrap resample);
    the figures are those of the probes repeated that many times.
    """
    weights = np.ones(len(result.mated), np.int64) if weights is None else np.asarray(weights, np.int64)
    mated_weights = weights[result.mated]
    hits = {k: int(mated_weights[result.rank < k].sum()) for k in ks}
    num_mated = int(mated_weights.sum())
    summary = {f"top{k}": hits[k] / num_mated if num_mated else float("nan") for k in ks}
    summary.update(num_gallery=result.num_gallery, num_mated=num_mated, num_nonmated=int(weights.sum()) - num_mated)
    if result.correct is None:
        return summary, hits, None
    order = np.argsort(-result.nonmated_best, kind="stable")
    impostor = result.nonmated_best[order]
    cumulative = np.cumsum(weights[~result.mated][order])

    def tpir(fraction):
        passed = result.correct & (result.score > _threshold(impostor, fraction, cumulative))
        return int(mated_weights[passed].sum()) / num_mated if num_mated else float("nan")

    summary["TPIR@FPIR"] = {key: tpir(Fraction(key)) for key in FPIR_KEYS}
    return summary, hits, np.array([tpir(f) for f in CURVE_FPIR])


def identification(sims, gallery_subjects, probe_subjects, ks=TOPK, fpir=True):
    """1:N search results from ``sims`` (probes × gallery cosine similarities): :func:`search` counted
    by :func:`search_summary`. Returns (summary dict, top-k hit counts, TPIR curve on ``CURVE_FPIR``)."""
    return search_summary(search(sims, gallery_subjects, probe_subjects, fpir), ks)


def gallery_searches(galleries, probes, probe_subjects, mixed=True):
    """:class:`Search` of ``probes`` in each gallery ``{name: (features, subjects)}`` and, with
    ``mixed``, in their union (the per-gallery similarities written side by side into one array, so
    the union search copies nothing): ``({name: Search}, union Search or None)``."""
    bounds = np.cumsum([0, *(len(g[0]) for g in galleries.values())])
    all_sims = np.empty((len(probes), bounds[-1]), np.result_type(probes, *(g[0] for g in galleries.values())))
    searches = {}
    for i, (name, (feats, subjects)) in enumerate(galleries.items()):
        sims = all_sims[:, bounds[i]:bounds[i + 1]]
        np.matmul(probes, feats.T, out=sims)
        searches[name] = search(sims, subjects, probe_subjects)
    union = None
    if mixed:
        union_subjects = np.concatenate([g[1] for g in galleries.values()])
        union = search(all_sims, union_subjects, probe_subjects, fpir=False)
    return searches, union


def searches_report(searches, union=None, weights=None):
    """1:N report (docs/evaluation.md, Protocol step 6) of :func:`gallery_searches`' outcomes.

    Overall top-k = hits in all galleries / probes; overall TPIR = mean over galleries; ``mixed`` =
    top-k against the union of the galleries. ``weights``: integer multiplicity of each probe (a
    bootstrap resample). Returns (report dict, {name: TPIR curve, "mean": their mean}).
    """
    report, hits, curves = {}, {k: 0 for k in TOPK}, {}
    for name, found in searches.items():
        report[name], found_hits, curves[name] = search_summary(found, TOPK, weights)
        for k in TOPK:
            hits[k] += found_hits[k]
    num_probes = len(next(iter(searches.values())).mated) if weights is None else int(np.sum(weights))
    overall = {f"top{k}": hits[k] / num_probes for k in TOPK}
    overall["TPIR@FPIR"] = {key: float(np.mean([report[n]["TPIR@FPIR"][key] for n in searches]))
                            for key in FPIR_KEYS}
    result = dict(overall, **report)
    if union is not None:
        mixed = search_summary(union, TOPK, weights)[0]
        result["mixed"] = {f"top{k}": mixed[f"top{k}"] for k in TOPK}
    curves["mean"] = np.mean([curves[n] for n in searches], axis=0)
    return result, curves


def identification_report(galleries, probes, probe_subjects, mixed=True):
    """1:N report over galleries ``{name: (features, subjects)}`` searched by ``probes``
    (:func:`gallery_searches` counted by :func:`searches_report`)."""
    return searches_report(*gallery_searches(galleries, probes, probe_subjects, mixed))
