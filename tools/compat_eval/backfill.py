"""The upgrade lifecycle on a compatibility protocol: backfill curves and negative flips.

A deployment re-extracts its gallery with the new model bit by bit (backfilling, or hot refresh)
while new-model queries search it. :func:`backfill_curves` measures the figures of
:mod:`~tools.compat_eval.protocol` at fractions 0, 0.1, …, 1 of the gallery re-extracted, for
several orders of re-extraction (random, old-feature norm, a file, and the ground-truth oracle as
an upper reference) and two ways of merging the two score scales, with the negative and positive
flips of each point and the area under each curve; in the FastFill setting the items not yet
re-extracted are the old gallery mapped by a transform. Definitions and sources: docs/compat.md.

The unit of re-extraction is an **identity**: at a fraction f the first round(f·n) gallery
identities of the order (and, for the 1:1 protocol, the first round(f·m) of the m identities held
out of the 1:N gallery) have every gallery-side image embedded by the new model.
"""
import math

import numpy as np
import torch
from tqdm import tqdm

from tools.compat_eval.protocol import SEARCH_BLOCK, SEARCH_DEPTH
from tools.ijbc_eval import bootstrap, metrics
from utils.errors import UserError, require
from utils.io import atomic_path

FRACTIONS = tuple(np.round(np.linspace(0, 1, 11), 1).tolist())
ORDERS = ("random", "norm")
MERGES = ("plain", "calibrated")


# ------------------------------------------------------------------------------------------ orders
def random_order(num_identities, seed=0):
    """A seeded random permutation of the identities."""
    return np.random.default_rng([seed, 3]).permutation(num_identities)


def norm_order(raw_old, labels, gallery_images):
    """Identities by increasing mean pre-normalisation norm of their old features (least reliable first).

    ``raw_old``: the old model's image features before L2 normalisation (embedding + mirrored
    embedding); the mean runs over an identity's 1:N gallery images, or all its images when it has
    none (identities held out of the 1:N gallery). Ties keep identity order.
    """
    labels = np.asarray(labels)
    norms = np.linalg.norm(np.asarray(raw_old, np.float64), axis=1)
    num = int(labels.max()) + 1
    enrolled = np.bincount(labels[gallery_images], minlength=num) > 0
    use = ~enrolled[labels]
    use[gallery_images] = True
    mean = np.bincount(labels[use], norms[use], num) / np.maximum(np.bincount(labels[use], minlength=num), 1)
    return np.argsort(mean, kind="stable")


def read_order(path, identity_names, seed=0):
    """The identities of ``path`` (one identity name per line, first re-extracted first); those not listed
    follow in the seeded random order. Unknown or repeated names are refused with the line number."""
    index = {str(name): i for i, name in enumerate(identity_names)}
    listed, seen = [], set()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            name = line.strip()
            if not name:
                continue
            require(name in index, f"{path} line {number}: unknown identity '{name}' (expected one identity "
                                   "name per line: a folder name of --data, or a label number of --rec)")
            require(name not in seen, f"{path} line {number}: identity '{name}' listed twice")
            seen.add(name)
            listed.append(index[name])
    require(listed, f"{path}: lists no identity (expected one identity name per line)")
    rest = random_order(len(identity_names), seed)
    return np.r_[listed, rest[~np.isin(rest, listed)]].astype(np.int64)


def oracle_order(protocol, gallery, new, far, seed=0):
    """The oracle order, an upper reference computed from the ground truth (not a usable policy):
    identities by decreasing gain of re-extracting them, ties in the seeded random order.

    The gain of identity c: of the 1:1 pairs whose gallery-side image is c's, how many more are
    decided right (genuine accepted, impostor rejected) with c re-extracted than without, each space
    at its own threshold of false accept rate ``far`` (new-vs-new: the new self-test's, new-vs-``gallery``:
    the cross-test's). Counted at those fixed thresholds the right decisions of a mixed gallery add
    up over identities, so this order has the most of them at every fraction (its own figure,
    :func:`endpoint_decisions`); on the curves' figures it is the reference an informed order is
    judged against. ``gallery``: the features of the items not yet re-extracted (the old model's,
    or the transformed old gallery's)."""
    decided = endpoint_decisions(protocol, gallery, new, far)
    num = int(protocol.labels.max()) + 1
    gain = np.bincount(protocol.labels[protocol.first], decided[True].astype(np.int64) - decided[False], num)
    ties = random_order(num, seed)
    return ties[np.argsort(-gain[ties], kind="stable")]


def endpoint_decisions(protocol, gallery, new, far):
    """{True: whether each 1:1 pair is decided right in the new self-test, False: in the cross-test (new
    query, ``gallery``)}, each at its own threshold of false accept rate ``far``."""
    return {space: decisions(protocol.genuine, metrics.pair_scores(g, new, protocol.first, protocol.second), far)
            for space, g in ((True, new), (False, gallery))}


def refreshed_identities(order, protocol, fraction):
    """bool per identity: re-extracted at ``fraction`` — the first round(f·n) of the n 1:N gallery
    identities in ``order`` and the first round(f·m) of the m other identities (1:1 gallery side)."""
    refreshed = np.zeros(len(order), bool)
    in_gallery = np.isin(order, protocol.mated_identities)
    for group in (order[in_gallery], order[~in_gallery]):
        refreshed[group[:int(round(fraction * len(group)))]] = True
    return refreshed


def mixed_features(old, new, labels, refreshed):
    """Per image the new feature when its identity is re-extracted, else the old one."""
    return np.where(refreshed[np.asarray(labels)][:, None], new, old)


# ------------------------------------------------------------------------------------- calibration
class FarMap:
    """Monotone map of one score space to the common scale −log10 FAR, fitted on impostor scores.

    FAR(s) = share of the fit impostor scores ≥ s, at each distinct fit score; linear between them
    and beyond the ends (with the slope of the end segments), so the map is strictly increasing.
    """

    def __init__(self, impostor_scores):
        scores = np.sort(np.asarray(impostor_scores, np.float64))
        require(len(scores) >= 2, "score calibration needs at least 2 impostor scores per space and fold")
        self.points, first = np.unique(scores, return_index=True)
        self.levels = -np.log10((len(scores) - first) / len(scores))

    def __call__(self, scores):
        x, y = self.points, self.levels
        scores = np.asarray(scores, np.float64)
        if len(x) == 1:
            return y[0] + scores - x[0]
        low, high = (y[1] - y[0]) / (x[1] - x[0]), (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.interp(scores, x, y) + np.where(scores < x[0], (scores - x[0]) * low, 0) \
            + np.where(scores > x[-1], (scores - x[-1]) * high, 0)


class Calibration:
    """The calibrated merge: new-vs-new and new-vs-old scores mapped to −log10 FAR by :class:`FarMap`\\ s.

    Cross-fitted on two halves of the identities (seeded): the scores of a query of one half go through
    the maps fitted on the impostor pairs of the protocol between identities of the other half, so no
    score is calibrated with its own query identity's pairs. The space of a score is the gallery side's:
    new-vs-new when that image's identity is ``refreshed``, else new-vs-old.
    """

    def __init__(self, protocol, old, new, seed=0):
        labels = protocol.labels
        self.fold = np.random.default_rng([seed, 4]).permutation(int(labels.max()) + 1) % 2
        impostor = ~protocol.genuine
        first, second = protocol.first[impostor], protocol.second[impostor]
        self.maps = {}
        for fold in (0, 1):
            fit = (self.fold[labels[first]] != fold) & (self.fold[labels[second]] != fold)
            for space, gallery in ((True, new), (False, old)):
                self.maps[fold, space] = FarMap(metrics.pair_scores(gallery, new, first[fit], second[fit]))
        self.labels, self.refreshed = labels, None

    def space(self, scores, probe_images, space):
        """``scores`` of one space (True: new-vs-new) mapped by each probe image's fold (``probe_images``
        broadcast to the scores' shape): the values :meth:`__call__` gives where the gallery side is in ``space``."""
        scores = np.asarray(scores, np.float64)
        fold = np.broadcast_to(self.fold[self.labels[probe_images]], scores.shape)
        out = np.empty(scores.shape)
        for f in (0, 1):
            out[fold == f] = self.maps[f, space](scores[fold == f])
        return out

    def at(self, refreshed):
        """This calibration for the gallery state ``refreshed`` (bool per identity)."""
        self.refreshed = refreshed
        return self

    def __call__(self, scores, probe_images, gallery_images):
        scores = np.asarray(scores, np.float64)
        fold = np.broadcast_to(self.fold[self.labels[probe_images]], scores.shape)
        space = np.broadcast_to(self.refreshed[self.labels[gallery_images]], scores.shape)
        out = np.empty(scores.shape)
        for (f, s), far_map in self.maps.items():
            where = (fold == f) & (space == s)
            out[where] = far_map(scores[where])
        return out


# ---------------------------------------------------------------------------------- mixed galleries
def mixed_outcomes(protocol, old, new, chains, calibration=None, block=SEARCH_BLOCK):
    """``[[(pair scores, Search)]]`` of new-model queries against the mixed gallery of each state
    (bool per identity: re-extracted) of each chain (states each holding the one before, as the
    fractions of one order), the same as ``protocol.outcomes(new, mixed_features(…),
    calibration.at(state))`` state by state, from each score space computed once: the one merge
    of :func:`merged_outcomes`."""
    return merged_outcomes(protocol, old, new, chains, [calibration], block)[0]


def merged_outcomes(protocol, old, new, chains, calibrations, block=SEARCH_BLOCK):
    """:func:`mixed_outcomes` of each merge of ``calibrations`` (None: the plain merge) in one pass
    over the probes: ``out[merge][chain][state]`` = (pair scores, Search).

    A gallery item is new or old as a whole, so a mixed score is the new-vs-new or the new-vs-old
    score of the same pair (or probe and template): both spaces are scored once (1:1 pairs, and the
    probes against both template sets in blocks of probes holding ``block`` similarities at most,
    shared by the merges), and a state only picks per identity which space counts. In a chain a
    template column is new from its first state on, so each probe's counts above its target score
    (for either space of the target) are summed once per stretch of columns that turn new together
    and every state adds up its stretches; the comparisons with the targets are made once for all
    chains (:func:`_chain_search`). Ranks are capped at the search depth as :func:`protocol.search`
    reports them. The calibrated merge maps each space monotonically (float32 values, as the search
    transform gives them), so a count of mapped scores above a mapped target is a count of raw
    scores above the raw bound found per probe (:func:`_bounds`): only the pair scores, the targets
    and the non-mated maxima are mapped.
    """
    labels, first, second = protocol.labels, protocol.first, protocol.second
    spaces = {True: new, False: old}
    raw_pairs = {space: metrics.pair_scores(g, new, first, second) for space, g in spaces.items()}
    weights = np.ones(len(protocol.gallery_images))
    templates = {space: protocol.templates.features(g[protocol.gallery_images], None, weights, "N0D0F0")
                 .astype(np.float32) for space, g in spaces.items()}
    ids = protocol.templates.ids
    index = metrics.gallery_index(ids)
    segments = []
    for chain in chains:
        columns = np.array([np.asarray(state)[ids] for state in chain]).reshape(len(chain), len(ids))
        require(not (columns[:-1] & ~columns[1:]).any(), "backfill: the states of a chain must be nested")
        segments.append(len(chain) - columns.sum(0))     # a column is new from this state on
    probe_images = protocol.probe_images
    step = max(1, block // len(ids))
    parts = [[[[] for _ in chain] for chain in chains] for _ in calibrations]
    for s in tqdm(range(0, len(probe_images), step), desc="backfill search", unit="block", leave=False,
                  disable=len(probe_images) <= step):
        rows = probe_images[s:s + step]
        query = np.ascontiguousarray(new[rows], np.float32)
        sims = {space: query @ t.T for space, t in templates.items()}    # numpy's product, as the search's exact pass
        pos = np.minimum(np.searchsorted(index.subjects, labels[rows]), len(ids) - 1)
        mated = index.subjects[pos] == labels[rows]
        for merge, calibration in enumerate(calibrations):
            found = _chain_search(sims, calibration, rows, segments, [len(c) for c in chains], mated,
                                  index.first[pos[mated]])
            for c, chain_found in enumerate(found):
                for k, state_found in enumerate(chain_found):
                    parts[merge][c][k].append(state_found)
    out = []
    for calibration, merge_parts in zip(calibrations, parts):
        pairs = raw_pairs if calibration is None else \
            {space: calibration.space(scores, second, space) for space, scores in raw_pairs.items()}
        mixed = {}                                           # a state's pair scores, once for all chains
        for state in (np.asarray(state) for chain in chains for state in chain):
            if state.tobytes() not in mixed:
                mixed[state.tobytes()] = np.where(state[labels[first]], pairs[True], pairs[False])
        out.append([[(mixed[np.asarray(state).tobytes()],
                      metrics.Search(*(np.concatenate(f) for f in zip(*blocks)), num_gallery=len(ids)))
                     for state, blocks in zip(chain, chain_parts)]
                    for chain, chain_parts in zip(chains, merge_parts)])
    return out


def _chain_search(sims, calibration, probe_images, segments, nums, mated, target):
    """Per chain c and state k < ``nums[c]`` the (mated, rank, score, correct, nonmated best) of
    :func:`metrics.search` on the mixed rows of one block: column j in the new space (``sims[True]``)
    when ``segments[c][j]`` ≤ k, else in the old one, each space's float32 scores mapped by
    ``calibration`` (None: as they are); ``probe_images``: the block's rows; ``target``: the target
    column of each mated row (one column per subject).

    Each row's scores in each space are compared once with its target's score in either space: the
    scores above it are counted per stretch of columns of every chain at once (a product with the
    chains' one-hot segments), the scores equal to it (few: the target itself and exact ties) are
    listed."""
    def mapped(space, values, at):
        values = np.asarray(values, np.float32)
        return values if calibration is None else calibration.space(values, probe_images[at], space).astype(np.float32)

    num_columns = len(segments[0])
    offsets = np.r_[0, np.cumsum([num + 1 for num in nums])]
    onehot = np.zeros((num_columns, offsets[-1]), np.float32)
    for seg, offset in zip(segments, offsets):
        onehot[np.arange(num_columns), offset + seg] = 1
    onehot = torch.from_numpy(onehot)
    rows = np.flatnonzero(mated)
    value = {space: mapped(space, sims[space][rows, target], rows) for space in (True, False)}
    target_new = [seg[target][:, None] <= np.arange(num) for seg, num in zip(segments, nums)]   # rows × states
    above = [np.zeros((len(rows), num), np.int64) for num in nums]
    ties = [np.zeros((2, len(rows), num), np.int64) for num in nums]   # all, before the target column
    buffer = torch.empty(len(rows) * num_columns, dtype=torch.float32)
    every = np.arange(len(rows))
    for space in (True, False):
        raw = np.ascontiguousarray(sims[space][rows])
        bounds = {version: (np.nextafter(value[version], np.float32(-np.inf)), value[version]) if calibration is None
                  else _bounds(lambda x, at: mapped(space, x, rows[at]), value[version], raw)
                  for version in (True, False)}    # raw > below ⇔ mapped ≥ the target, raw > upper ⇔ mapped > it
        raw[every, target] = -np.inf       # the target column itself: counted below where it is in this space
        highest = raw.max(1)
        for version in (True, False):                                  # the target's score in either space
            below, upper = bounds[version]
            busy = np.flatnonzero(highest > below)           # rows with another column at or above the target
            part = raw[busy] if 2 * len(busy) < len(rows) else raw          # (all rows when most are busy)
            busy = busy if part is not raw else every
            compared = buffer[:part.size].view(part.shape)
            torch.gt(torch.from_numpy(part), torch.from_numpy(upper[busy])[:, None], out=compared)
            higher = np.zeros((len(rows), onehot.shape[1]), np.int64)
            higher[busy] = torch.mm(compared, onehot).round_().to(torch.int64).numpy()   # exact below 2**24
            row, col = np.nonzero(part == upper[busy, None] if calibration is None else      # equal to the target
                                  (part > below[busy, None]) & (part <= upper[busy, None]))
            row = busy[row]
            for c, (seg, num) in enumerate(zip(segments, nums)):
                use = target_new[c] == version
                totals = np.cumsum(higher[:, offsets[c]:offsets[c + 1]], 1)   # columns of segments ≤ k
                above[c] += np.where(use, totals[:, :num] if space else totals[:, -1:] - totals[:, :num], 0)
                count = use[row] & ((seg[col][:, None] <= np.arange(num)) == space)
                np.add.at(ties[c][0], row, count)
                before = col < target[row]
                np.add.at(ties[c][1], row[before], count[before])
                if version == space:           # the target, in this space exactly where its score is this one
                    ties[c][0] += use
    nonmated = np.flatnonzero(~mated)
    nonmated_sims = {space: sims[space][nonmated] for space in (True, False)}
    depth = min(SEARCH_DEPTH, num_columns)
    found = []
    for c, (seg, num) in enumerate(zip(segments, nums)):
        best = np.full((len(nonmated), num + 1, 2), -np.inf, np.float32)
        filled = np.flatnonzero(np.bincount(seg, minlength=num + 1))          # segments with columns
        order = np.argsort(seg, kind="stable")
        starts = np.searchsorted(seg[order], filled)
        if len(nonmated):
            for i, space in enumerate((True, False)):                         # each segment's best column
                stretch_best = np.maximum.reduceat(nonmated_sims[space][:, order], starts, axis=1)
                best[:, filled, i] = mapped(space, stretch_best, nonmated[:, None])
        new_best = np.maximum.accumulate(best[:, :, 0], axis=1)[:, :num]
        old_best = np.maximum.accumulate(best[:, ::-1, 1], axis=1)[:, ::-1][:, 1:]
        score = np.where(target_new[c], value[True][:, None], value[False][:, None])
        found.append([(mated, np.minimum(above[c][:, j] + ties[c][1][:, j], depth), score[:, j],
                       above[c][:, j] + ties[c][0][:, j] == 1, np.maximum(new_best[:, j], old_best[:, j]))
                      for j in range(num)])
    return found


def _bounds(mapped, value, raw):
    """Per row of ``raw`` (float32 scores) the largest float32 x with mapped(x) < value and the largest
    with mapped(x) ≤ value (``mapped(x, rows)`` nondecreasing in x), searched by bisection over the
    float32 values between the row's extremes: mapped(raw) > value ⇔ raw > the second bound, and
    mapped(raw) = value ⇔ the first bound < raw ≤ the second."""
    rows = np.arange(len(raw))
    low0 = _key(raw.min(1, initial=np.inf)) - 1
    high0 = _key(raw.max(1, initial=-np.inf)) + 1
    out = []
    for strict in (True, False):
        low, high = low0.copy(), high0.copy()                      # mapped(low) below (or at) value, high not
        while True:
            open_rows = np.flatnonzero(high - low > 1)
            if not len(open_rows):
                break
            mid = (low[open_rows] + high[open_rows]) // 2
            y = mapped(_value(mid), rows[open_rows])
            ok = y < value[open_rows] if strict else y <= value[open_rows]
            low[open_rows] = np.where(ok, mid, low[open_rows])
            high[open_rows] = np.where(ok, high[open_rows], mid)
        out.append(_value(low))
    return out


def _key(x):
    """Integers in the order of the float32 values ``x`` (−0 and +0 equal)."""
    bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _value(key):
    """The float32 value of :func:`_key` ``key``."""
    return np.where(key >= 0, key, -key + (1 << 31)).astype(np.uint32).view(np.float32)


# ------------------------------------------------------------------------------------------- flips
TOP1_FLIPS = ("negative_flips", "positive_flips", "relative_negative_flips")
PAIR_FLIPS = ("negative_flips_genuine", "positive_flips_genuine", "negative_flips_impostor", "positive_flips_impostor")
OPEN_FLIPS = ("negative_flips_open_mated", "positive_flips_open_mated", "negative_flips_open_nonmated",
              "positive_flips_open_nonmated")
FLIP_FPIR = 0.1   # the FPIR of the open-set 1:N flips (the demo's TPIR@FPIR=1e-1)


def _share(flag, base, weights):
    """Weighted share of ``flag`` among ``base`` (NaN on an empty base)."""
    total = weights[base].sum()
    return float(weights[flag & base].sum() / total) if total else np.nan


def top1_flips(old_search, new_search, weights=None):
    """1:N top-1 flips over the mated probes (each repeated ``weights`` times, default once):
    ``negative_flips`` (right before, with old query and old gallery, wrong after), ``positive_flips``
    (the reverse) and ``relative_negative_flips`` = negative / ((1 − old error) · new error) (Yan et al.)."""
    before, after = old_search.rank == 0, new_search.rank == 0
    weights = np.ones(len(before)) if weights is None else np.asarray(weights, np.float64)
    every = np.ones(len(before), bool)
    negative, positive = _share(before & ~after, every, weights), _share(~before & after, every, weights)
    expected = _share(before, every, weights) * _share(~after, every, weights)
    return {"negative_flips": negative, "positive_flips": positive,
            "relative_negative_flips": negative / expected if expected else np.nan}


def open_set_accepts(search, fpir, weights):
    """``(mated, nonmated)``: which mated probes are identified (right subject first and above the
    threshold) and which non-mated probes raise an alarm (best score above it), at the threshold of
    false positive identification rate ``fpir`` among the non-mated probes repeated ``weights`` times
    (per probe) — the threshold and rule of TPIR@FPIR (:func:`metrics.search_summary`)."""
    best = search.nonmated_best
    order = np.argsort(-best, kind="stable")
    threshold = metrics._threshold(best[order], fpir, np.cumsum(weights[~search.mated][order]))
    return search.correct & (search.score > threshold), best > threshold


def open_set_flips(old_search, new_search, fpir=FLIP_FPIR, weights=None, before=None):
    """Open-set 1:N flips at ``fpir``, each system at its own threshold: ``negative_flips_open_mated``
    (mated probes identified by the old system and missed after: newly rejected or misidentified) and
    ``positive_flips_open_mated`` (the reverse), over the mated probes; ``negative_flips_open_nonmated``
    (non-mated probes silent before and raising an alarm after) and ``positive_flips_open_nonmated``
    (the reverse), over the non-mated probes. ``weights``: each probe's multiplicity (default once);
    ``before``: the old system's :func:`open_set_accepts` at these weights when already made (a curve's
    points share it)."""
    weights = np.ones(len(old_search.mated), np.int64) if weights is None else np.asarray(weights, np.int64)
    mated_before, alarm_before = open_set_accepts(old_search, fpir, weights) if before is None else before
    mated_after, alarm_after = open_set_accepts(new_search, fpir, weights)
    on_mated, on_nonmated = weights[old_search.mated], weights[~old_search.mated]
    every_mated, every_nonmated = np.ones(len(on_mated), bool), np.ones(len(on_nonmated), bool)
    return {"negative_flips_open_mated": _share(mated_before & ~mated_after, every_mated, on_mated),
            "positive_flips_open_mated": _share(~mated_before & mated_after, every_mated, on_mated),
            "negative_flips_open_nonmated": _share(~alarm_before & alarm_after, every_nonmated, on_nonmated),
            "positive_flips_open_nonmated": _share(alarm_before & ~alarm_after, every_nonmated, on_nonmated)}


def acceptance(genuine, scores, far, resampled=False):
    """``accepts(weights)``: whether each pair is accepted at the threshold of false accept rate ``far``
    among the pairs repeated ``weights`` times: its score is above the impostor score of rank
    max(floor(n·far) − 1, 0) (highest first, n the weighted impostor count). Without ``resampled``
    every weight is 1 and the threshold is found by a partial sort; with it the impostors are
    sorted once for any weights."""
    impostor = np.flatnonzero(~genuine)
    if not resampled:
        rank = max(math.floor(len(impostor) * far) - 1, 0)
        threshold = -np.partition(-scores[impostor], rank)[rank] if len(impostor) else -np.inf
        return lambda weights: scores > threshold
    order = impostor[np.argsort(-scores[impostor], kind="stable")]
    ranked = scores[order]
    return lambda weights: scores > metrics._threshold(ranked, far, np.cumsum(weights[order]))


def decisions(genuine, scores, far):
    """Whether each pair is decided right (genuine accepted, impostor rejected) at ``far``, each pair once."""
    return acceptance(genuine, scores, far)(np.ones(len(scores))) == genuine


def pair_flips(genuine, old_scores, new_scores, far, weight_rows=(), before=None):
    """1:1 flips at ``far``, each kind over its own pairs: ``({kind: share}, {kind: (B,)} or None)``.

    Genuine pairs accepted by the old model at its threshold and rejected by the updated system at its
    own (``negative_flips_genuine``), the reverse (``positive_flips_genuine``); impostor pairs rejected
    before and accepted after (``negative_flips_impostor``), the reverse (``positive_flips_impostor``).
    ``weight_rows``: pair multiplicities of bootstrap resamples (thresholds recomputed on each);
    ``before``: the old scores' :func:`acceptance` when already made (a curve's points share it).
    """
    resampled = len(weight_rows) > 0
    before = acceptance(genuine, old_scores, far, resampled) if before is None else before
    after = acceptance(genuine, new_scores, far, resampled)

    def shares(weights):
        a, b = before(weights), after(weights)
        return {"negative_flips_genuine": _share(a & ~b, genuine, weights),
                "positive_flips_genuine": _share(~a & b, genuine, weights),
                "negative_flips_impostor": _share(~a & b, ~genuine, weights),
                "positive_flips_impostor": _share(a & ~b, ~genuine, weights)}

    figures = shares(np.ones(len(genuine)))
    rows = [shares(np.asarray(w, np.float64)) for w in weight_rows]
    return figures, {key: np.array([r[key] for r in rows]) for key in figures} if rows else None


# ------------------------------------------------------------------------------------------- curves
def area(fractions, values):
    """Area under a curve over the fraction axis (trapezoids), divided by the axis length: in [0, 1]
    for figures in [0, 1]; along the last axis of ``values``."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    fractions = np.asarray(fractions, np.float64)
    return trapezoid(np.asarray(values, np.float64), fractions, axis=-1) / (fractions[-1] - fractions[0])


def backfill_curve(protocol, old, new, order, counts=None, merge="plain", far=1e-3, calibration=None,
                   fractions=FRACTIONS, outcomes=None, old_outcomes=None, gallery=None, figures=None):
    """One curve: the figures of new-model queries against the mixed gallery at each fraction.

    ``old``, ``new``: image features of the two generations; ``order``: identities, first re-extracted
    first; ``gallery``: the features of the items not yet re-extracted (default ``old``; the FastFill
    setting: the old gallery mapped by a transform); ``outcomes``: the :func:`mixed_outcomes` of the
    fractions' states and ``old_outcomes`` those of the old system (old query, old gallery; computed
    here when not given); ``figures``: each point's ``protocol.figures`` when already counted (curves
    of one merge share their first and last points). Returns the ``"backfill"`` entry of the report (without
    ``order``/``query``/``gallery``/``old``/``fastfill``).
    """
    labels = protocol.labels
    old_scores, old_search = protocol.outcomes(old, old) if old_outcomes is None else old_outcomes
    if outcomes is None:
        outcomes = mixed_outcomes(protocol, old if gallery is None else gallery, new,
                                  [[refreshed_identities(order, protocol, f) for f in fractions]],
                                  None if merge == "plain" else calibration)[0]
    rows, reps = {}, {}
    flips, flip_reps = ({key: [] for key in TOP1_FLIPS + PAIR_FLIPS + OPEN_FLIPS} for _ in range(2))
    probe_labels = labels[protocol.probe_images]
    mated = probe_labels[old_search.mated]
    pair_weights = [] if counts is None else [bootstrap.pair_weights(row, labels[protocol.first], labels[protocol.second])
                                              for row in counts]
    before = acceptance(protocol.genuine, old_scores, far, counts is not None)
    probe_weights = [] if counts is None else [np.asarray(row[probe_labels], np.int64) for row in counts]
    open_before = open_set_accepts(old_search, FLIP_FPIR, np.ones(len(probe_labels), np.int64))
    open_before_reps = [open_set_accepts(old_search, FLIP_FPIR, w) for w in probe_weights]
    for k, (scores, found) in enumerate(outcomes):
        point_figures, replicates = protocol.figures(scores, found, counts) if figures is None else figures[k]
        for name in point_figures:
            rows.setdefault(name, []).append(point_figures[name])
            if replicates is not None:
                reps.setdefault(name, []).append(replicates[name])
        point, point_reps = pair_flips(protocol.genuine, old_scores, scores, far, pair_weights, before)
        point.update(top1_flips(old_search, found))
        point.update(open_set_flips(old_search, found, before=open_before))
        if counts is not None:
            resampled = [{**top1_flips(old_search, found, row[mated]),
                          **open_set_flips(old_search, found, weights=w, before=b)}
                         for row, w, b in zip(counts, probe_weights, open_before_reps)]
            point_reps.update({key: np.array([r[key] for r in resampled]) for key in TOP1_FLIPS + OPEN_FLIPS})
        for key in flips:
            flips[key].append(point[key])
            if counts is not None:
                flip_reps[key].append(point_reps[key])
    entry = {"merge": merge, "fractions": list(fractions), "metrics": rows, **flips,
             "old_self": protocol.figures(old_scores, old_search)[0],
             "flip_far": far, "flip_fpir": FLIP_FPIR, "area": {name: float(area(fractions, rows[name])) for name in rows}}
    if counts is not None:
        stacked = {name: np.stack(reps[name], 1) for name in rows}   # resamples × fractions
        intervals = {name: np.array([bootstrap.percentile_intervals(column) for column in stacked[name].T])
                     for name in rows}
        entry["ci_low"] = {name: intervals[name][:, 0].tolist() for name in rows}
        entry["ci_high"] = {name: intervals[name][:, 1].tolist() for name in rows}
        area_intervals = {name: bootstrap.percentile_intervals(area(fractions, stacked[name])) for name in rows}
        entry["area_ci_low"] = {name: v[0] for name, v in area_intervals.items()}
        entry["area_ci_high"] = {name: v[1] for name, v in area_intervals.items()}
        for key, columns in flip_reps.items():
            bounds = np.array([bootstrap.percentile_intervals(column) for column in columns])
            entry[f"{key}_ci_low"], entry[f"{key}_ci_high"] = bounds[:, 0].tolist(), bounds[:, 1].tolist()
    return entry


def backfill_curves(protocol, old, new, orders, names, counts=None, merges=MERGES, far=1e-3, seed=0, gallery=None,
                    gallery_name=None):
    """Every (order, merge) curve of gallery generation ``names[0]`` re-extracted by query generation
    ``names[1]``: the report's ``"backfill"`` list. ``orders``: {name: identities, first re-extracted first}.

    ``gallery``: the features of the items not yet re-extracted when they are not the old model's —
    the FastFill setting, the old gallery mapped by a transform h (named ``gallery_name``, e.g.
    ``v1 + linear``): the curve runs from the cross-test against h(old) to the new self-test. The
    flips and ``old_self`` stay those of the old system (old query, old gallery)."""
    fastfill = gallery is not None
    gallery = old if gallery is None else gallery
    calibration = Calibration(protocol, gallery, new, seed) if "calibrated" in merges else None
    old_outcomes = protocol.outcomes(old, old)
    chains = [[refreshed_identities(order, protocol, f) for f in FRACTIONS] for order in orders.values()]
    entries, total = [], len(orders) * len(merges)
    merged = merged_outcomes(protocol, gallery, new, chains,
                             [None if merge == "plain" else calibration for merge in merges])
    setting = "FastFill curve" if fastfill else "backfill curve"
    for merge, outcomes in zip(merges, merged):
        counted = {}                                   # a state's figures, counted once for all orders
        for curve, chain, (name, order) in zip(outcomes, chains, orders.items()):
            print(f"{setting} {len(entries) + 1}/{total}: {name} order, {merge} merge", flush=True)
            figures = []
            for state, point in zip(chain, curve):
                if state.tobytes() not in counted:
                    counted[state.tobytes()] = protocol.figures(*point, counts)
                figures.append(counted[state.tobytes()])
            entries.append({"order": name, "query": names[1], "gallery": gallery_name if fastfill else names[0],
                            "old": names[0], "fastfill": fastfill,
                            **backfill_curve(protocol, old, new, order, counts, merge, far, calibration,
                                             outcomes=curve, old_outcomes=old_outcomes, figures=figures)})
    return sorted(entries, key=lambda e: (list(orders).index(e["order"]), list(merges).index(e["merge"])))


def flip_far(metric):
    """The FAR of the 1:1 flips: the main metric's when it is a TAR@FAR, else 1e-3."""
    return float(metric.split("=")[1]) if metric.startswith("TAR@FAR=") else 1e-3


# ------------------------------------------------------------------------------------------ report
ORDER_WORDS = {"random": "random order", "norm": "smallest old-feature norm first",
               "oracle": "oracle order (ground truth, upper reference)", "file": "your order (--backfill_order)"}
MERGE_WORDS = {"plain": "scores merged as they are", "calibrated": "scores calibrated to one FAR scale"}


def metric_words(name):
    """A figure's name in words: ``TAR@FAR=1e-4`` → ``TAR at FAR=1e-4 (1:1)``."""
    if name.startswith("TAR@FAR="):
        return f"TAR at FAR={name.split('=')[1]} (1:1 verification)"
    if name.startswith("TPIR@FPIR="):
        return f"TPIR at FPIR={name.split('=')[1]} (1:N open set)"
    if name.startswith("top"):
        return f"top-{name[3:]} identification rate (1:N)"
    return "area under the ROC (1:1)" if name == "AUC" else name


def curve_words(entry):
    """One curve in words: queries, gallery, order and merge."""
    old = entry.get("old", entry["gallery"])
    gallery = f"{old}'s gallery transformed ({entry['gallery']})" if entry.get("fastfill") else f"{old}'s gallery"
    return (f"{entry['query']} queries, {gallery}: {ORDER_WORDS.get(entry['order'], entry['order'] + ' order')}, "
            f"{MERGE_WORDS.get(entry['merge'], entry['merge'])}")


def format_backfill(entries, main):
    """Markdown: per curve the main metric, top-1 and the flips at each fraction with intervals, the areas."""
    lines = []
    for e in entries:
        old = e.get("old", e["gallery"])
        setting = (f"FastFill: {old}'s gallery transformed ({e['gallery']}) until re-extracted" if e.get("fastfill")
                   else f"Backfill of {e['gallery']}'s gallery")
        lines += ["", f"{setting} by {e['query']} (order {e['order']}, {e['merge']} merge): "
                  f"fraction re-extracted, {main} and top1, 1:N top-1 flips over the mated probes (negative, "
                  f"positive, relative negative), 1:1 flips at FAR={e['flip_far']:g} over the genuine pairs and over "
                  f"the impostor pairs, open-set 1:N flips at FPIR={e.get('flip_fpir', FLIP_FPIR):g} over the mated "
                  "and over the non-mated probes (95 % intervals in brackets)", "",
                  f"| fraction | {main} | top1 | negative flips | positive flips | relative negative | "
                  "genuine negative | genuine positive | impostor negative | impostor positive | "
                  "open mated negative | open mated positive | open non-mated negative | open non-mated positive |",
                  "|---" * 14 + "|"]
        for k, fraction in enumerate(e["fractions"]):
            cells = [_cell(e["metrics"][name][k], e.get("ci_low", {}).get(name), e.get("ci_high", {}).get(name), k)
                     for name in (main, "top1")]
            cells += [_cell(e[key][k], e.get(f"{key}_ci_low"), e.get(f"{key}_ci_high"), k)
                      for key in TOP1_FLIPS + PAIR_FLIPS + OPEN_FLIPS]
            lines.append(f"| {fraction:.1f} | " + " | ".join(cells) + " |")
        areas = ", ".join(f"{name} {e['area'][name]:.4f}" + _area_interval(e, name) for name in (main, "top1"))
        lines += ["", f"Area under the curve: {areas}; the old system ({old} self-test): "
                  f"{main} {e['old_self'][main]:.4f}, top1 {e['old_self']['top1']:.4f}"]
    if entries:
        lines += ["", "Areas side by side (" + main + " / top1):", ""]
        lines += [f"- {e['query']} → {e['gallery']}, {e['order']} order, {e['merge']} merge: {e['area'][main]:.4f} / "
                  f"{e['area']['top1']:.4f}" for e in entries]
    return "\n".join(lines) + "\n"


def _cell(value, low, high, k):
    """``0.1234 [0.1000, 0.1500]`` (the interval when there is one)."""
    return f"{value:.4f}" + (f" [{low[k]:.4f}, {high[k]:.4f}]" if low is not None else "")


def _area_interval(entry, name):
    if "area_ci_low" not in entry:
        return ""
    return f" [{entry['area_ci_low'][name]:.4f}, {entry['area_ci_high'][name]:.4f}]"


def plot_backfill(entries, path, main):
    """PNG readable on its own: ``main`` and top-1 (with 95 % bands; dashed: the old system's
    self-test), the 1:N negative flips and the genuine pairs' 1:1 negative flips against the share of
    the gallery re-extracted, one line per curve, each named in words (queries, gallery, order, merge,
    areas) in one legend under the panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_inches = 0.22 * len(entries) + 0.4
    fig, axes = plt.subplots(2, 2, figsize=(15, 10 + legend_inches))
    axes = axes.ravel()
    styles = {"plain": "-", "calibrated": ":"}
    curves = list(dict.fromkeys((e["query"], e.get("fastfill", False), e["order"]) for e in entries))
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    handles = []
    for e in entries:
        label = f"{curve_words(e)} — area {e['area'][main]:.3f} ({main}), {e['area']['top1']:.3f} (top-1)"
        colour = colours(curves.index((e["query"], e.get("fastfill", False), e["order"])))
        for i, (ax, key) in enumerate(zip(axes, (main, "top1", "negative_flips", "negative_flips_genuine"))):
            values, low, high = ((e["metrics"][key], e.get("ci_low", {}).get(key), e.get("ci_high", {}).get(key))
                                 if i < 2 else (e[key], e.get(f"{key}_ci_low"), e.get(f"{key}_ci_high")))
            line, = ax.plot(e["fractions"], values, marker="s" if e.get("fastfill") else "o", markersize=4,
                            linewidth=1.6, linestyle=styles.get(e["merge"], "-"), color=colour, label=label)
            if i == 0:
                handles.append(line)
            if low is not None:
                ax.fill_between(e["fractions"], low, high, color=colour, alpha=0.08, linewidth=0)
    for ax, name in zip(axes[:2], (main, "top1")):
        for old, old_self in {e.get("old", e["gallery"]): e["old_self"][name] for e in entries}.items():
            ax.axhline(old_self, color="k", linestyle="--", linewidth=1.2)
            ax.annotate(f"old system ({old} queries, {old} gallery): {old_self:.3f}", (0.01, old_self),
                        xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 4), fontsize=10)
    far = entries[0]["flip_far"] if entries else 1e-3
    for ax, (title, ylabel) in zip(axes, (
            (metric_words(main), f"{main} (higher is better)"),
            ("1:N identification: top-1 rate", "top-1 identification rate (higher is better)"),
            ("1:N negative flips: probes the old system got right at top-1, the updated one gets wrong",
             "share of mated probes (lower is better)"),
            (f"1:1 negative flips at FAR={far:g}: genuine pairs accepted before, rejected now",
             "share of genuine pairs (lower is better)"))):
        ax.set_title(title, fontsize=11.5)
        ax.set_xlabel("share of the gallery's identities re-extracted with the new model", fontsize=11)
        ax.set_ylabel(ylabel, fontsize=11)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
    queries = ", ".join(dict.fromkeys(e["query"] for e in entries))
    olds = ", ".join(dict.fromkeys(e.get("old", e["gallery"]) for e in entries))
    notes = ["share 0: the cross-test, share 1: the new model's self-test"]
    if any(e["merge"] == "calibrated" for e in entries):
        notes.append("solid lines: scores merged as they are, dotted: calibrated")
    if any(e.get("fastfill") for e in entries):
        notes.append("squares: FastFill, the gallery transformed until re-extracted")
    fig.suptitle(f"Backfill: {olds}'s gallery re-extracted bit by bit with the new model ({queries}) while its "
                 "queries search it\n" + "; ".join(notes[:2]) + "".join("\n" + n for n in notes[2:]), fontsize=12.5)
    fig.legend(handles=handles, loc="lower center", ncol=1, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / (10 + legend_inches), 1, 0.94))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def check_pair(names, pair):
    """``(old index, new index)`` of ``--backfill [OLD NEW]`` (default: the last two generations)."""
    if not pair:
        require(len(names) >= 2, "--backfill needs two generations (give 2+ --models)")
        return len(names) - 2, len(names) - 1
    require(len(pair) == 2, f"--backfill: give OLD NEW (two generation names), got {' '.join(pair)}")
    for name in pair:
        require(name in names, f"--backfill: unknown generation '{name}' (expected one of {', '.join(names)})")
    old, new = names.index(pair[0]), names.index(pair[1])
    if old == new:
        raise UserError(f"--backfill: OLD and NEW are the same generation '{pair[0]}'")
    return old, new
