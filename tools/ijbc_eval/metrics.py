"""IJB metrics (SPEC §5): image → template features, 1:1 verification, 1:N identification.

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


class Templates:
    """Template aggregation as one sparse matrix: weight of an image = 1 / frames of its media.

    ``ids`` are the sorted template ids (rows); a template feature is the sum over its media of the
    media's mean image feature, L2-normalised.
    """

    def __init__(self, templates, medias):
        templates, medias = np.asarray(templates), np.asarray(medias)
        self.ids, row = np.unique(templates, return_inverse=True)
        _, media = np.unique(medias, return_inverse=True)
        _, group, counts = np.unique(row.astype(np.int64) * (media.max() + 1) + media,
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
        for start in range(0, num_images, _CHUNK_ROWS):
            part = slice(start, start + _CHUNK_ROWS)
            feats = image_features(embs[part], None if embs_f is None else embs_f[part], scores[part], variant)
            out += self.matrix[:, part] @ feats.astype(np.float64)
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
    Pairs are bucketed by row block with a counting sort, so no pass is longer than linear.
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
    block = r1 // step
    num_blocks = int(block.max()) + 1 if len(block) else 0
    order = np.argsort(block.astype(np.uint16) if num_blocks <= 1 << 16 else block, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(block, minlength=num_blocks))]
    for b in range(num_blocks):
        sel = order[bounds[b]:bounds[b + 1]]
        if len(sel):
            first = b * step
            gram = feats1[rows[first:first + step]] @ right
            scores[sel] = gram.ravel()[(r1[sel] - first) * len(cols) + c2[sel]]
    return scores


def roc(labels, scores, weights=None):
    """``(fpr, tpr)`` exactly as sklearn ``roc_curve(labels, scores)``, fed pre-sorted input.

    ``roc_curve`` only depends on the counts of genuine and impostor scores at each distinct score,
    so the scores are sorted once (a fast value sort, not an argsort), the genuine labels are
    placed inside their tie groups, and ``roc_curve`` receives the arrays in descending order.
    ``weights``: integer multiplicity of each pair (a bootstrap resample); the curve is the one of
    the pairs repeated that many times (pairs of weight 0 left out).
    """
    from sklearn.metrics import roc_curve  # imported here: sklearn is slow to import and 1:N does not need it

    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    if weights is not None:
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
    genuine = np.sort(scores[labels])
    within_ties = np.arange(num_pos) - np.searchsorted(genuine, genuine, "left")
    sorted_labels = np.zeros(len(ordered), np.int8)
    sorted_labels[np.searchsorted(ordered, genuine, "left") + within_ties] = 1
    fpr, tpr, _ = roc_curve(sorted_labels[::-1], ordered[::-1])
    return fpr, tpr


def tar_at_far(fpr, tpr, keys=FAR_KEYS):
    """TAR at each FAR: reverse the arrays, take tpr at argmin |fpr − FAR| (largest tpr on ties)."""
    fpr_r, tpr_r = fpr[::-1], tpr[::-1]
    return {key: float(tpr_r[np.argmin(np.abs(fpr_r - float(key)))]) for key in keys}


def verification(labels, scores, weights=None):
    """``{"TAR@FAR": {...}, "AUC": …}`` and the ROC ``(fpr, tpr)`` (``weights``: see :func:`roc`)."""
    from sklearn.metrics import auc

    fpr, tpr = roc(labels, scores, weights)
    return {"TAR@FAR": tar_at_far(fpr, tpr), "AUC": float(auc(fpr, tpr))}, (fpr, tpr)


def _threshold(sorted_desc, fraction, cumulative=None):
    """SPEC §5.6 threshold: sorted[max(floor(n·f) − 1, 0)] (−inf without non-mated probes).

    ``cumulative``: running total of integer weights along ``sorted_desc``; the threshold is then
    taken in the list where each score is repeated as often as its weight.
    """
    n = len(sorted_desc) if cumulative is None else int(cumulative[-1]) if len(cumulative) else 0
    if n == 0:
        return -np.inf
    position = max(math.floor(n * fraction) - 1, 0)
    return sorted_desc[position if cumulative is None else np.searchsorted(cumulative, position, "right")]


class Search(NamedTuple):
    """Per-probe outcome of a 1:N search (:func:`search`), from which every 1:N figure is counted."""
    mated: np.ndarray          # bool per probe: its subject is in the gallery
    rank: np.ndarray           # per mated probe: place of its target in the sorted gallery
    score: np.ndarray          # per mated probe: similarity to its target
    correct: np.ndarray        # per mated probe: target above every other subject's score (None without fpir)
    nonmated_best: np.ndarray  # per non-mated probe: its best similarity (None without fpir)
    num_gallery: int


def search(sims, gallery_subjects, probe_subjects, fpir=True):
    """:class:`Search` outcomes from ``sims`` (probes × gallery cosine similarities).

    A probe is mated when its subject has a gallery template; its target is the subject's first
    gallery template. Rank = place of the target when the gallery is sorted by decreasing
    similarity, ties kept in gallery order. ``correct``: the target score is above every other
    subject's score (the TPIR condition besides the threshold).
    """
    if sims.shape[1] == 0:
        raise UserError("1:N evaluation: empty gallery")
    subjects, first = np.unique(gallery_subjects, return_index=True)
    pos = np.minimum(np.searchsorted(subjects, probe_subjects), len(subjects) - 1)
    mated = subjects[pos] == probe_subjects
    target = first[pos[mated]]
    mated_sims = sims if mated.all() else sims[mated]
    score = mated_sims[np.arange(len(target)), target][:, None]
    columns = np.arange(sims.shape[1])[None, :]
    rank = (mated_sims > score).sum(1) + ((mated_sims == score) & (columns < target[:, None])).sum(1)
    correct = nonmated_best = None
    if fpir:
        same = gallery_subjects[None, :] == probe_subjects[mated][:, None]
        correct = score[:, 0] > np.where(same, -np.inf, mated_sims).max(1, initial=-np.inf)
        nonmated_best = sims[~mated].max(1, initial=-np.inf)
    return Search(mated, rank, score[:, 0], correct, nonmated_best, int(sims.shape[1]))


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


def identification_report(galleries, probes, probe_subjects, mixed=True):
    """SPEC §5.6 report over galleries ``{name: (features, subjects)}`` searched by ``probes``.

    Overall top-k = hits in all galleries / probes; overall TPIR = mean over galleries; ``mixed`` =
    top-k against the union of the galleries (the per-gallery similarities side by side).
    Returns (report dict, {name: TPIR curve, "mean": their mean}).
    """
    report, hits, curves, all_sims = {}, {k: 0 for k in TOPK}, {}, []
    for name, (feats, subjects) in galleries.items():
        all_sims.append(probes @ feats.T)
        report[name], found, curves[name] = identification(all_sims[-1], subjects, probe_subjects)
        for k in TOPK:
            hits[k] += found[k]
    overall = {f"top{k}": hits[k] / len(probe_subjects) for k in TOPK}
    overall["TPIR@FPIR"] = {key: float(np.mean([report[n]["TPIR@FPIR"][key] for n in galleries]))
                            for key in FPIR_KEYS}
    result = dict(overall, **report)
    if mixed:
        union_subjects = np.concatenate([g[1] for g in galleries.values()])
        union = identification(np.hstack(all_sims), union_subjects, probe_subjects, fpir=False)[0]
        result["mixed"] = {f"top{k}": union[f"top{k}"] for k in TOPK}
    curves["mean"] = np.mean([curves[n] for n in galleries], axis=0)
    return result, curves
