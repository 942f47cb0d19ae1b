"""Bootstrap confidence intervals by resampling subjects (identities) with replacement.

A resample draws S subjects with replacement out of the S subjects of a test set
(``numpy.random.default_rng(seed)``, so it is the same for the same seed); ``counts[b, s]`` says how
often subject ``s`` was drawn in resample ``b``. Statistics are recomputed from these
multiplicities instead of materialised copies, with the metric code of :mod:`metrics`:

- **1:1 verification** (:func:`verification_replicates`): a pair whose templates belong to
  subjects ``a`` ≠ ``b`` appears ``counts[a] · counts[b]`` times (every copy of ``a`` meets every
  copy of ``b``); a pair inside one subject (genuine) ``counts[a]`` times (it stays inside each copy).
  Pairs of undrawn subjects drop out.
- **1:N identification** (:func:`identification_replicates`): the gallery is fixed and the probe
  subjects are resampled; a probe of subject ``s`` appears ``counts[s]`` times. The search is run
  once (:func:`metrics.search`), each resample only recounts its outcomes.

Typical use (IJB: 1:1 subjects of the pairs' templates; 1:N subjects of the probes)::

    num_subjects, (s1, s2) = subject_index(subjects_of_t1, subjects_of_t2)
    counts = subject_counts(num_subjects, 1000, seed=0)                 # (B, S) int32
    reps = verification_replicates(labels, scores, s1, s2, counts)    # {"TAR@FAR": {"1e-4": (B,), …}, "AUC": (B,)}
    percentile_intervals(reps)                                        # same nesting, [low, high] (95 %)
    percentile_intervals(difference(reps_a, reps_b))                  # paired: both from the same counts

Replicates are nested dicts of float arrays (one value per resample); resamples where a figure is
undefined (no genuine pair or no mated probe drawn) give NaN and are left out of the percentiles.
"""
import numpy as np

from tools.ijbc_eval import metrics
from utils.errors import UserError, require


def subject_index(*subject_arrays):
    """``(num_subjects, [index arrays])``: subject labels of any type mapped to 0 … S−1, jointly."""
    sizes = [len(a) for a in subject_arrays]
    _, inverse = np.unique(np.concatenate([np.asarray(a) for a in subject_arrays]), return_inverse=True)
    num_subjects = int(inverse.max()) + 1 if len(inverse) else 0
    return num_subjects, np.split(inverse.astype(np.int64), np.cumsum(sizes)[:-1])


def subject_counts(num_subjects, num_resamples, seed=0):
    """(num_resamples, num_subjects) int32: how often each subject is drawn in each resample."""
    require(num_resamples >= 1, f"the number of bootstrap resamples must be >= 1, got {num_resamples}")
    require(num_subjects >= 1, "bootstrap needs at least one subject")
    draws = np.random.default_rng(seed).integers(0, num_subjects, (num_resamples, num_subjects))
    offsets = np.arange(num_resamples)[:, None] * num_subjects
    return np.bincount((draws + offsets).ravel(), minlength=num_resamples * num_subjects) \
        .reshape(num_resamples, num_subjects).astype(np.int32)


def pair_weights(counts, subjects1, subjects2):
    """Multiplicity of each pair in the resample ``counts`` (one row): c[a]·c[b], or c[a] when a = b."""
    c1, c2 = counts[subjects1].astype(np.int64), counts[subjects2].astype(np.int64)
    return np.where(subjects1 == subjects2, c1, c1 * c2)


def replicates(statistic, weight_rows):
    """Stack ``statistic(weights)`` (a nested dict of numbers; UserError → NaN) over the resamples."""
    results, failed = [], []
    for weights in weight_rows:
        try:
            results.append(statistic(weights))
        except UserError:
            results.append(None)
            failed.append(len(results) - 1)
    template = next((r for r in results if r is not None), None)
    require(template is not None, "every bootstrap resample is degenerate (too few subjects?)")
    results = [r if r is not None else _nested_map(lambda _: np.nan, template) for r in results]
    return _nested_map(lambda *values: np.asarray(values, np.float64), *results)


def verification_replicates(labels, scores, subjects1, subjects2, counts):
    """``{"TAR@FAR": {key: (B,)}, "AUC": (B,)}`` over the resamples ``counts`` (B, S) (:func:`metrics.verification`)."""
    subjects1, subjects2 = np.asarray(subjects1), np.asarray(subjects2)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")   # sorted once: each resample's sort is linear
    labels, scores, subjects1, subjects2 = (np.asarray(a)[order] for a in (labels, scores, subjects1, subjects2))
    return replicates(lambda weights: metrics.verification(labels, scores, weights)[0],
                      (pair_weights(row, subjects1, subjects2) for row in counts))


def identification_replicates(search, probe_subjects, counts, ks=metrics.TOPK):
    """``{"top1": (B,), …, "TPIR@FPIR": {key: (B,)}}`` of a :class:`metrics.Search` over the resamples ``counts``."""
    probe_subjects = np.asarray(probe_subjects)

    def statistic(weights):
        summary = metrics.search_summary(search, ks, weights)[0]
        return {key: value for key, value in summary.items() if not key.startswith("num_")}

    return replicates(statistic, (row[probe_subjects] for row in counts))


def percentile_intervals(reps, level=0.95):
    """Percentile interval ``[low, high]`` of every replicate array (NaN resamples left out)."""
    require(0 < level < 1, f"the interval level must lie in (0, 1), got {level}")
    tail = 50 * (1 - level)

    def interval(values):
        finite = values[np.isfinite(values)]
        return [float(v) for v in np.percentile(finite, [tail, 100 - tail])] if len(finite) else [np.nan, np.nan]

    return _nested_map(interval, reps)


def difference(reps_a, reps_b):
    """Replicates of a − b, figure by figure (paired: both computed from the same counts)."""
    return _nested_map(np.subtract, reps_a, reps_b)


def _nested_map(fn, *trees):
    """Apply ``fn`` leaf-wise over dicts of equal structure."""
    if isinstance(trees[0], dict):
        return {key: _nested_map(fn, *(t[key] for t in trees)) for key in trees[0]}
    return fn(*trees)
