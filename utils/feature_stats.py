"""Per-class statistics of old-model features: prototypes, denoising masks, NCCL and AdvBCT metadata.

Inputs are an ``N×d`` float array (usually a read-only memory map of ``<SD>_feature.npy``) and
``N`` integer labels in dataset order. Every function streams the rows in chunks, so memory stays
at a few chunks plus ``C×d`` class tables (no normalised copy of the whole file is made), and labels
need not be sorted or contiguous: per-class sums are scatter-added chunk by chunk (a one-hot sparse
product) and per-class rankings come from one stable sort of ``(label, value)``.

``n̂`` below is L2 normalisation of each row (an all-zero row stays zero).
"""
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from utils.errors import UserError

CHUNK_BYTES = 64 << 20          # float64 working set of one chunk of rows
_EPS_VAR = 1e-10                # added to per-class distance variances (NCCL), as published


def check_inputs(features, labels, num_classes=None):
    """Validate ``features``/``labels``; return ``(labels as int64 ndarray, num_classes)``.

    ``num_classes`` defaults to ``max(label) + 1``. Row values are checked (NaN/inf) while the
    statistics stream the rows, so a bad row is reported before anything is written.
    """
    if getattr(features, "ndim", None) != 2 or not np.issubdtype(features.dtype, np.floating):
        raise UserError(f"features must be a 2-D float array (N×d), got "
                        f"{getattr(features, 'dtype', type(features).__name__)} "
                        f"of shape {getattr(features, 'shape', '?')}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(features):
        raise UserError(f"features have {len(features)} rows but labels have {len(labels)} entries")
    if len(labels) == 0:
        raise UserError("features and labels are empty")
    if features.shape[1] == 0:
        raise UserError("features have 0 columns")
    labels = labels.astype(np.int64, copy=False)
    if labels.min() < 0:
        row = int(np.argmax(labels < 0))
        raise UserError(f"labels must be >= 0, row {row} has label {labels[row]}")
    top = int(labels.max())
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        row = int(np.argmax(labels >= num_classes))
        raise UserError(f"row {row} has label {labels[row]} but num_classes is {num_classes}")
    return labels, int(num_classes)


def _step(features, chunk_rows):
    return int(chunk_rows) if chunk_rows else max(1024, CHUNK_BYTES // (8 * features.shape[1]))


def _check_finite(block, start):
    bad = ~np.isfinite(block.sum(axis=1))
    if bad.any():
        rows = np.flatnonzero(bad & ~np.isfinite(block).all(axis=1))
        if len(rows):
            raise UserError(f"row {start + int(rows[0])} contains NaN or inf")


def check_finite_rows(features, chunk_rows=None):
    """Raise UserError naming the first row of ``features`` that holds NaN or inf."""
    for _ in iter_chunks(features, chunk_rows, check_finite=True):
        pass


def _normalize(block):
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    norms[norms == 0] = 1
    return block / norms[:, None]


def iter_chunks(features, chunk_rows=None, normalize=False, scale=None, check_finite=False):
    """Yield ``(start, float32 block)`` over the rows; optionally n̂ and then ×``scale`` per column."""
    step = _step(features, chunk_rows)
    for start in range(0, len(features), step):
        block = np.asarray(features[start:start + step], dtype=np.float32)
        if check_finite:
            _check_finite(block, start)
        if normalize:
            block = _normalize(block)
        if scale is not None:
            block = block * scale
        yield start, block


def _scatter_sum(block, labels, out):
    """``out[c] += Σ block rows with label c``: a float32 one-hot sparse product over the chunk's
    label range, accumulated across chunks in float64."""
    low, high = int(labels.min()), int(labels.max()) + 1
    onehot = sp.csc_matrix((np.ones(len(labels), np.float32), labels - low, np.arange(len(labels) + 1)),
                           shape=(high - low, len(labels)))
    out[low:high] += onehot @ block


def class_sums(features, labels, num_classes, normalize_inputs=False, scale=None, chunk_rows=None,
               check_finite=True):
    """Per-class float64 sums of the (optionally n̂, then column-scaled) rows, and class counts."""
    sums = np.zeros((num_classes, features.shape[1]), dtype=np.float64)
    for start, block in iter_chunks(features, chunk_rows, normalize_inputs, scale, check_finite):
        _scatter_sum(block, labels[start:start + len(block)], sums)
    return sums, np.bincount(labels, minlength=num_classes).astype(np.int64)


def _means(sums, counts):
    return sums / np.maximum(counts, 1)[:, None]


def class_means(features, labels, num_classes=None, normalize_inputs=False, chunk_rows=None):
    """Per-class means ``(C×d float32, counts int64)``; rows are n̂ first if ``normalize_inputs``.

    A class without samples has an all-zero mean and count 0.
    """
    labels, num_classes = check_inputs(features, labels, num_classes)
    sums, counts = class_sums(features, labels, num_classes, normalize_inputs, chunk_rows=chunk_rows)
    return _means(sums, counts).astype(np.float32), counts


def class_prototypes(features, labels, num_classes=None, chunk_rows=None):
    """Class prototypes as published for BCT/UniBCT: n̂(mean of the raw rows of class c), C×d float32.

    Row c is class c for every class ``0..C-1``; a class without samples raises UserError.
    """
    means, counts = class_means(features, labels, num_classes, chunk_rows=chunk_rows)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise UserError(f"{len(empty)} of {len(counts)} classes have no samples "
                        f"(first: class {empty[0]}); every class needs at least one image")
    return _normalize(means.astype(np.float64)).astype(np.float32)


def column_scale(features, chunk_rows=None):
    """The published denoiser's column normalisation: ``1 / ‖column j of n̂(X)‖₂`` over all rows.

    (scikit-learn ``normalize(normalize(X), axis=0)``: rows to unit L2 norm, then every column to
    unit L2 norm over the whole dataset; an all-zero column keeps scale 1.)
    """
    squares = np.zeros(features.shape[1], dtype=np.float64)
    for _, block in iter_chunks(features, chunk_rows, normalize=True, check_finite=True):
        squares += np.einsum("ij,ij->j", block, block, dtype=np.float64)
    norms = np.sqrt(squares)
    norms[norms == 0] = 1
    return (1.0 / norms).astype(np.float32)


def member_distances(features, labels, centres, normalize_inputs=True, scale=None, chunk_rows=None):
    """Euclidean distance (float64, length N) of every (n̂, column-scaled) row to its class centre.

    Differences are taken in float32 (as the rows are) and their squares summed in float64.
    """
    centres = np.asarray(centres, dtype=np.float32)
    distances = np.empty(len(labels), dtype=np.float64)
    for start, block in iter_chunks(features, chunk_rows, normalize_inputs, scale):
        stop = start + len(block)
        diff = block - centres[labels[start:stop]]
        distances[start:stop] = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    return distances


def _normalized_centres(features, labels, num_classes, scale=None, chunk_rows=None):
    sums, counts = class_sums(features, labels, num_classes, True, scale, chunk_rows,
                              check_finite=scale is None)
    centres = _means(sums, counts)
    return centres, counts, member_distances(features, labels, centres, True, scale, chunk_rows)


def _class_order(values, labels, counts):
    """Order by (label, value), ties in dataset order; also each class's first position.

    One stable sort of the float64 key ``label·K + value`` with K = 2·max value (values ≥ 0):
    values closer than ``2·C·2⁻⁵²`` of the largest value (~1e-11 for 65k classes) count as ties.
    """
    span = 2.0 * float(values.max()) or 1.0
    order = np.argsort(labels * span + values, kind="stable")
    starts = np.cumsum(counts) - counts
    return order, starts


def credible_mask(features, labels, T, column_norm=False, num_classes=None, chunk_rows=None):
    """MixBCT denoising mask (uint8, length N): 1 for the ``ceil(T·n_c)`` rows of each class nearest
    (Euclidean) to the class mean of the n̂ rows; ties go to the earlier row in dataset order.

    ``ceil(T·n)`` is the published ``math.ceil(T * n)`` in float64, rounding error included: ``T = 0.55,
    n = 100`` keeps 56 (55.00000000000001), ``T = 0.7, n = 10`` keeps 7 (exactly 7.0). ``column_norm`` first applies
    :func:`column_scale` (the published denoiser's extra step).
    """
    T = float(T)
    if not 0.0 <= T <= 1.0:
        raise UserError(f"T must be in [0, 1], got {T}")
    labels, num_classes = check_inputs(features, labels, num_classes)
    scale = column_scale(features, chunk_rows) if column_norm else None
    _, counts, distances = _normalized_centres(features, labels, num_classes, scale, chunk_rows)
    order, starts = _class_order(distances, labels, counts)
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    keep = np.ceil(T * counts.astype(np.float64)).astype(np.int64)
    return (rank < keep[labels]).astype(np.uint8)


def _entropy_rows(scores, probs):
    """Shannon entropy (nats, float64) of each row: ``softmax(scores)`` or ``scores`` as probabilities.

    For logits, with z = scores − row max and S = Σ e^z: H = log S − Σ e^z·z / S (one exp pass).
    """
    if probs:
        p = scores / scores.sum(axis=1, keepdims=True, dtype=np.float64)
        return -np.einsum("ij,ij->i", p, np.log(np.where(p > 0, p, 1)))
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1, dtype=np.float64)
    return np.log(total) - np.einsum("ij,ij->i", e, z, dtype=np.float64) / total


def nccl_credible_mask(scores, probs=False, chunk_rows=None):
    """NCCL highly-credible filter from class scores: 1 where the prediction entropy is ≤ log(C)/2.

    ``scores``: ``N×C`` logits (softmax over each row) or, with ``probs=True``, probabilities; the
    threshold uses C = ``scores.shape[1]``. Returns a uint8 mask of length N.
    """
    if getattr(scores, "ndim", None) != 2 or scores.shape[1] < 2:
        raise UserError(f"NCCL scores must be an N×C array with C >= 2, got shape {getattr(scores, 'shape', '?')}")
    threshold = np.log(scores.shape[1]) / 2
    mask = np.empty(len(scores), dtype=np.uint8)
    step = int(chunk_rows) if chunk_rows else max(1, CHUNK_BYTES // (8 * scores.shape[1]))
    for start in range(0, len(scores), step):
        block = np.asarray(scores[start:start + step])
        _check_finite(block, start)
        mask[start:start + len(block)] = _entropy_rows(block, probs) <= threshold
    return mask


def nccl_feature_credible_mask(features, labels, num_classes=None, chunk_rows=None):
    """NCCL highly-credible filter computed from old features alone (no old classifier needed).

    Class centres ``c_k`` = mean of the n̂ rows of class k; ``d_ik = ‖n̂(o_i) − c_k‖``; ``σ²_c`` = the
    variance of the distances of class c's members to ``c_c`` (+1e-10). Each row gets the class
    distribution ``p_ik = softmax_k(−d_ik / σ²_{y_i})`` over all C centres and is kept (1) when its
    entropy is ≤ log(C)/2. Cost is an N×C×d product (chunked): about 2 CPU-hours for 3.6M × 65k × 128.
    """
    labels, num_classes = check_inputs(features, labels, num_classes)
    if num_classes < 2:
        raise UserError("NCCL credibility needs at least 2 classes")
    centres, counts, distances = _normalized_centres(features, labels, num_classes, None, chunk_rows)
    mean_d = np.bincount(labels, distances, num_classes) / np.maximum(counts, 1)
    var = np.bincount(labels, (distances - mean_d[labels]) ** 2, num_classes) / np.maximum(counts, 1)
    inv_var = (1.0 / (var + _EPS_VAR)).astype(np.float32)
    centres32 = centres.astype(np.float32)
    centre_sq = np.einsum("ij,ij->i", centres32, centres32)
    threshold = np.log(num_classes) / 2
    mask = np.empty(len(labels), dtype=np.uint8)
    step = chunk_rows or max(1, CHUNK_BYTES // (8 * num_classes))
    for start, block in iter_chunks(features, step, normalize=True):
        stop = start + len(block)
        sq = np.einsum("ij,ij->i", block, block)[:, None] + centre_sq[None, :] - 2 * block @ centres32.T
        logits = -np.sqrt(np.maximum(sq, 0)) * inv_var[labels[start:stop], None]
        mask[start:stop] = _entropy_rows(logits, probs=False) <= threshold
    return mask


class AdvBCTStats(NamedTuple):
    """AdvBCT class metadata: centres (C×d float32), radius = max kept member distance (C float32),
    member counts (C int64) and the number of kept distances per class (C int64)."""
    centres: np.ndarray
    radii: np.ndarray
    counts: np.ndarray
    num_radii: np.ndarray

    @property
    def valid(self):
        """Classes the elastic point-to-set loss uses: at least 2 kept distances."""
        return self.num_radii >= 2


def advbct_class_stats(features, labels, num_classes=None, chunk_rows=None):
    """AdvBCT metadata: centre = mean of the class's n̂ rows; member distances to it; for a class with
    ≥ 4 members drop distances outside [q1 − 1.5·IQR, q3 + 1.5·IQR] with the published quartiles
    ``q1 = sorted[⌊n/4⌋]``, ``q3 = sorted[⌊3n/4⌋]``; radius = the largest kept distance.
    """
    labels, num_classes = check_inputs(features, labels, num_classes)
    centres, counts, distances = _normalized_centres(features, labels, num_classes, None, chunk_rows)
    order, starts = _class_order(distances, labels, counts)
    ranked = distances[order]
    big = counts >= 4
    q1 = np.where(big, ranked[np.minimum(starts + counts // 4, len(ranked) - 1)], -np.inf)
    q3 = np.where(big, ranked[np.minimum(starts + (3 * counts) // 4, len(ranked) - 1)], np.inf)
    iqr = np.where(big, q3 - q1, 0)
    ranked_labels = labels[order]
    kept = (ranked >= (q1 - 1.5 * iqr)[ranked_labels]) & (ranked <= (q3 + 1.5 * iqr)[ranked_labels])
    radii = np.zeros(num_classes, dtype=np.float64)
    present = counts > 0
    radii[present] = np.maximum.reduceat(np.where(kept, ranked, 0.0), starts[present])
    num_radii = np.bincount(ranked_labels[kept], minlength=num_classes).astype(np.int64)
    return AdvBCTStats(centres.astype(np.float32), radii.astype(np.float32), counts, num_radii)
