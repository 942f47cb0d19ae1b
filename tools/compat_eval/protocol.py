"""compat_eval's protocol: the exact blocked 1:N search, the figures of one (query, gallery) cell and the matrix.

:func:`top_k` and :func:`search` are the exact 1:N search (blocked float32 products reduced to each
probe's top 8); :class:`Protocol` holds the pairs, gallery and probes of a data set and counts the
:data:`METRICS` of a cell; :func:`compatibility` makes the result dict: every cell with bootstrap
intervals, the verdicts and, for 3+ generations, the multi-generation figures (:func:`generations_summary`).
"""
import numpy as np
import torch

from tools.compat_eval import decision
from tools.compat_eval.data import identification_split, verification_pairs
from tools.ijbc_eval import bootstrap, metrics
from utils.errors import UserError, require

FAR_KEYS = ("1e-5", "1e-4", "1e-3", "1e-2", "1e-1")
FPIR_KEYS = ("1e-2", "1e-1")
TOPK = (1, 5)
METRICS = tuple(f"TAR@FAR={k}" for k in FAR_KEYS) + ("AUC",) + tuple(f"top{k}" for k in TOPK) \
    + tuple(f"TPIR@FPIR={k}" for k in FPIR_KEYS)
SEARCH_BLOCK = 1 << 25          # similarity entries per block of the exact 1:N search (128 MB of float32)
PROBE_ROWS = 2048               # probes per block of the search (the gallery is cut in chunks to fit the block)
SEARCH_DEPTH = 8                # gallery columns listed per probe: ranks are exact below it (top-k for k < 8)


# ----------------------------------------------------------------------------------------- search
def top_k(probes, gallery, k, block=SEARCH_BLOCK, probe_rows=PROBE_ROWS, transform=None):
    """Exact top-``k`` inner products: ``(values, columns)``, each (probes × k), best first.

    Blocked float32 matrix products (torch's BLAS) of ``probe_rows`` probes against gallery chunks of
    ``block // probe_rows`` rows, each chunk reduced to its own top k at once and merged into the
    running top k, so memory stays at one block of similarities whatever the gallery size. Values are
    exact; among equal values the columns kept are arbitrary (:func:`search` resolves such ties).
    ``transform(sims, rows, columns)``: a monotone map of the similarities (rows × columns indices,
    broadcast to their shape), applied to each block before its top k.
    """
    k = min(k, len(gallery))
    rows = max(1, min(probe_rows, len(probes), block))
    step = max(1, block // rows)
    gallery_t = torch.from_numpy(np.ascontiguousarray(gallery, np.float32))
    buffer = torch.empty(rows * min(step, len(gallery)), dtype=torch.float32)
    values = np.empty((len(probes), k), np.float32)
    columns = np.empty((len(probes), k), np.int64)
    for s in range(0, len(probes), rows):
        query = torch.from_numpy(np.ascontiguousarray(probes[s:s + rows], np.float32))
        best_v = best_i = None
        for c in range(0, len(gallery), step):
            chunk = gallery_t[c:c + step]
            sims = buffer[:len(query) * len(chunk)].view(len(query), len(chunk))
            torch.mm(query, chunk.T, out=sims)
            if transform is not None:
                sims.copy_(torch.from_numpy(_transformed(transform, sims.numpy(), np.arange(s, s + len(query))[:, None],
                                                         np.arange(c, c + len(chunk))[None, :])))
            v, i = torch.topk(sims, min(k, len(chunk)), dim=1)
            i += c
            if best_v is not None:
                v, pick = torch.topk(torch.cat([best_v, v], 1), min(k, best_v.shape[1] + v.shape[1]), dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, pick)
            best_v, best_i = v, i
        values[s:s + len(query)], columns[s:s + len(query)] = best_v.numpy(), best_i.numpy()
    return values, columns


def _transformed(transform, sims, rows, columns):
    """``transform`` of a block of similarities (float32, its shape); ``rows``, ``columns`` broadcast to it."""
    return np.asarray(transform(sims, rows, columns), np.float32).reshape(sims.shape)


def search(probes, gallery, gallery_subjects, probe_subjects, block=SEARCH_BLOCK, depth=SEARCH_DEPTH, transform=None):
    """Exact 1:N search of ``probes`` in ``gallery`` (features): the :class:`metrics.Search` that
    :func:`metrics.search` gives on the whole similarity matrix, from :func:`top_k` lists of ``depth``.

    Ranks are exact below ``depth``; a rank of ``depth`` means ``depth`` or more (only ranks below
    ``depth`` are counted: top-k for k < ``depth``). Rows the lists cannot settle exactly — a target
    score equal (within float rounding) to the last listed value, or a target outside the list whose
    listed columns all hold its own subject — are searched again against the whole gallery.
    """
    if len(gallery) == 0:
        raise UserError("1:N evaluation: empty gallery")
    index = metrics.gallery_index(gallery_subjects)
    subjects, first = index.subjects, index.first
    probe_subjects = np.asarray(probe_subjects)
    pos = np.minimum(np.searchsorted(subjects, probe_subjects), len(subjects) - 1)
    mated = subjects[pos] == probe_subjects
    rows = np.flatnonzero(mated)
    target = first[pos[mated]]
    values, columns = top_k(probes, gallery, depth, block, transform=transform)
    listed = columns[rows] == target[:, None]
    in_list = listed.any(1)
    direct = np.einsum("ij,ij->i", probes[rows].astype(np.float32), gallery[target].astype(np.float32))
    if transform is not None:
        direct = _transformed(transform, direct, rows, target)
    score = np.where(in_list, values[rows][np.arange(len(rows)), listed.argmax(1)], direct)
    v, c = values[rows], columns[rows]
    above = (v > score[:, None]).sum(1)
    ties_before = ((v == score[:, None]) & (c < target[:, None])).sum(1)
    rank = np.where(in_list, above + ties_before, values.shape[1])
    own = np.asarray(gallery_subjects)[c] == probe_subjects[rows][:, None]
    correct = np.where(in_list, ((v < score[:, None]) | own).all(1), False)
    last = v[:, -1]
    unsettled = (np.abs(last - score) <= 1e-6 * np.maximum(1, np.abs(score))) & (values.shape[1] < len(gallery))
    unsettled |= ~in_list & own.all(1)
    exact = rows[unsettled]
    if len(exact):
        again = _full_search(probes[exact], gallery, gallery_subjects, probe_subjects[exact], index, block,
                             None if transform is None else lambda sims, r, c: transform(sims, exact[r], c))
        rank[unsettled] = np.minimum(again.rank, values.shape[1])
        score[unsettled], correct[unsettled] = again.score, again.correct
    return metrics.Search(mated, rank, score.astype(np.float32), correct, values[~mated, 0].astype(np.float32)
                          if values.shape[1] else np.full((~mated).sum(), -np.inf), num_gallery=len(gallery))


def _full_search(probes, gallery, gallery_subjects, probe_subjects, index, block, transform=None):
    """:func:`metrics.search` on whole similarity rows, in blocks of probes (the rows :func:`search` cannot settle)."""
    step = max(1, block // len(gallery))
    columns = np.arange(len(gallery))

    def sims(s):
        block_sims = probes[s:s + step] @ gallery.T
        rows = np.arange(s, s + len(block_sims))[:, None]
        return block_sims if transform is None else _transformed(transform, block_sims, rows, columns[None, :])

    parts = [metrics.search(sims(s), gallery_subjects, probe_subjects[s:s + step], index=index)
             for s in range(0, len(probes), step)]
    return metrics.Search(*(np.concatenate([getattr(p, f) for p in parts]) for f in metrics.Search._fields[:-1]),
                          num_gallery=len(gallery))


class Protocol:
    """The pairs, gallery and probes of a data set (labels 0 … C−1), fixed by the seed."""

    def __init__(self, labels, max_genuine=None, impostors=1_000_000, gallery_per_id=1, nonmated_share=0.1,
                 seed=0):
        self.labels = np.asarray(labels, np.int64)
        self.first, self.second, self.genuine = verification_pairs(labels, max_genuine, impostors, seed)
        require(self.genuine.any(), "no genuine pair: every identity has a single image (need 2+ images for some)")
        gallery, probes, self.mated_identities = identification_split(labels, gallery_per_id, nonmated_share, seed)
        self.gallery_images = np.flatnonzero(gallery)
        self.probe_images = np.flatnonzero(probes)
        self.templates = metrics.Templates(self.labels[self.gallery_images], self.gallery_images)
        require(np.isin(self.labels[self.probe_images], self.mated_identities).any(),
                f"no mated probe: every gallery identity has at most --gallery_per_id {gallery_per_id} images")

    def summary(self):
        mated = np.isin(self.labels[self.probe_images], self.mated_identities)
        return dict(images=len(self.labels), identities=int(self.labels.max()) + 1,
                    genuine_pairs=int(self.genuine.sum()), impostor_pairs=int((~self.genuine).sum()),
                    gallery_identities=len(self.mated_identities), gallery_images=len(self.gallery_images),
                    mated_probes=int(mated.sum()), nonmated_probes=int((~mated).sum()))

    def cell(self, query, gallery, counts=None, calibration=None):
        """Figures (and bootstrap replicates over ``counts``) of query features vs gallery features
        (:meth:`outcomes` counted by :meth:`figures`)."""
        return self.figures(*self.outcomes(query, gallery, calibration), counts)

    def outcomes(self, query, gallery, calibration=None):
        """``(pair scores, Search)`` of query features vs gallery features.

        1:1: the first image of a pair uses the gallery model, the second the query model; 1:N: gallery
        templates from the gallery model, probe images from the query model. ``calibration``: a
        monotone map of every score (``calibration(scores, probe images, gallery images)``, arrays
        broadcast to the scores' shape; the gallery image of a template is its first enrolled image).
        """
        scores = metrics.pair_scores(gallery, query, self.first, self.second)
        require(np.isfinite(scores).all(), "non-finite similarity scores: the embeddings contain NaN or inf")
        templates = self.templates.features(gallery[self.gallery_images], None, np.ones(len(self.gallery_images)),
                                            "N0D0F0").astype(np.float32)
        transform = None
        if calibration is not None:
            scores = calibration(scores, self.second, self.first)
            transform = self._on_templates(calibration)
        found = search(query[self.probe_images], templates, self.templates.ids, self.labels[self.probe_images],
                       transform=transform)
        return scores, found

    def _on_templates(self, calibration):
        """``calibration`` as a search transform: probe rows → probe images, template columns → enrolled images."""
        enrolled = self.gallery_images[np.unique(self.labels[self.gallery_images], return_index=True)[1]]
        return lambda sims, rows, columns: calibration(sims, self.probe_images[rows], enrolled[columns])

    def figures(self, scores, found, counts=None):
        """:data:`METRICS` of pair scores and a :class:`metrics.Search` (and their bootstrap replicates)."""
        figures = _flatten(metrics.verification(self.genuine, scores)[0], metrics.search_summary(found, TOPK)[0])
        if counts is None:
            return figures, None
        reps = _flatten(bootstrap.verification_replicates(self.genuine, scores, self.labels[self.first],
                                                          self.labels[self.second], counts),
                        bootstrap.identification_replicates(found, self.labels[self.probe_images], counts, TOPK))
        return figures, reps


def _flatten(one_to_one, one_to_n):
    """The report's figures (:data:`METRICS`) from 1:1 and 1:N result dicts."""
    flat = {f"TAR@FAR={k}": one_to_one["TAR@FAR"][k] for k in FAR_KEYS}
    flat["AUC"] = one_to_one["AUC"]
    flat.update({f"top{k}": one_to_n[f"top{k}"] for k in TOPK})
    flat.update({f"TPIR@FPIR={k}": one_to_n["TPIR@FPIR"][k] for k in FPIR_KEYS})
    return flat


# ----------------------------------------------------------------------------------------- matrix
def compatibility(features, names, protocol, num_resamples=200, seed=0, metric="TAR@FAR=1e-4", transformed=None):
    """The result dict: every (query, gallery) cell with intervals, and a verdict per later generation.

    ``features``: per generation the (images × d) image features. Intervals are bootstrap
    percentile intervals over identities (the same resamples for every cell, so differences are paired).
    ``transformed``: ``(name, features, old index, new index)`` of an old gallery mapped by a gallery
    transform: one more cell (new queries vs it) and its verdict against the old model's self-test.
    """
    require(metric in METRICS, f"--metric {metric}: expected one of {', '.join(METRICS)}")
    counts = bootstrap.subject_counts(int(protocol.labels.max()) + 1, num_resamples, seed) if num_resamples else None
    cells, reps = [], {}
    check_sizes(names, [f.shape[1] for f in features])
    total = len(names) ** 2 + (transformed is not None)

    def progress(query, gallery):
        print(f"cell {len(cells) + 1}/{total}: {query} queries, {gallery} gallery"
              + (f", {num_resamples} bootstrap resamples" if counts is not None else ""), flush=True)

    for q, query in enumerate(features):
        for g, gallery in enumerate(features):
            progress(names[q], names[g])
            figures, reps[q, g] = protocol.cell(query, gallery, counts)
            cell = {"query": names[q], "gallery": names[g], **figures}
            if counts is not None:
                cell["interval"] = bootstrap.percentile_intervals(reps[q, g])
            cells.append(cell)
    if transformed is not None:
        name, gallery, old, new = transformed
        progress(names[new], name)
        figures, reps[new, name] = protocol.cell(features[new], gallery, counts)
        cells.append({"query": names[new], "gallery": name, "transform": True, **figures})
        if counts is not None:
            cells[-1]["interval"] = bootstrap.percentile_intervals(reps[new, name])
    value = {name: {(c["query"], c["gallery"]): c[name] for c in cells} for name in METRICS}
    verdicts = []
    for later in range(1, len(names)):
        for earlier in range(later):
            verdicts.append(_verdict(value, reps, counts is not None, metric, names[later], names[earlier],
                                     names[earlier], (later, earlier), (earlier, earlier)))
    if transformed is not None:
        verdicts.append(_verdict(value, reps, counts is not None, metric, names[new], name, names[old], (new, name),
                                 (old, old)))
    result = {"metric": metric, "generations": list(names), "protocol": protocol.summary(), "seed": seed,
              "bootstrap": num_resamples, "cells": cells, "verdicts": verdicts}
    if len(names) >= 3:
        grid = {(q, g): value[metric][names[q], names[g]] for q in range(len(names)) for g in range(len(names))}
        result.update(generations_summary(names, grid, None if counts is None else
                                          {key: reps[key][metric] for key in grid}))
    return result


def generations_summary(names, value, reps=None):
    """Average Compatibility, Average Multi-model accuracy (CoReS, Biondi et al., TPAMI 2023) and each
    generation's oldest compatible one.

    ``value[q, g]``: the main metric of query generation q against gallery generation g (indices,
    oldest first); ``reps[q, g]``: its bootstrap replicates. AC = share of the pairs i > j with
    M(i, j) > M(j, j); AM = mean of M(i, j) over j ≤ i. The oldest compatible generation of i is the
    oldest j ≤ i such that i's cross-test reaches the self-test of j and of every generation between
    (M(i, k) ≥ M(k, k) for j ≤ k < i, the verdicts' rule).
    """
    count = len(names)
    later = [(i, j) for i in range(count) for j in range(i)]
    lower = [(i, j) for i in range(count) for j in range(i + 1)]

    def figures(m):
        return (np.mean([m[i, j] > m[j, j] for i, j in later], axis=0),
                np.mean([m[i, j] for i, j in lower], axis=0))

    compatibility, multimodel = figures(value)
    result = {"average_compatibility": float(compatibility), "average_multimodel_accuracy": float(multimodel),
              "oldest_compatible": {names[i]: names[_oldest_compatible(value, i)] for i in range(count)}}
    if reps is not None:
        for key, replicate in zip(("average_compatibility", "average_multimodel_accuracy"), figures(reps)):
            result[f"{key}_ci_low"], result[f"{key}_ci_high"] = bootstrap.percentile_intervals(replicate)
    return result


def _oldest_compatible(value, i):
    """The oldest j ≤ i such that generation i reaches the self-test of every generation from j to i − 1."""
    j = i
    while j > 0 and decision.reaches(value[i, j - 1], value[j - 1, j - 1]):
        j -= 1
    return j


def _verdict(value, reps, intervals, metric, query, gallery, reference, cross_cell, self_cell):
    """``query`` searching ``gallery`` against the self-test of ``reference`` (the earlier generation), on the
    main metric; ``"margins"``: the margin (and its paired interval) of each of :func:`decision.verdict_metrics`.
    ``value[name][query, gallery]``: the figure ``name`` of a cell."""
    cross, own = value[metric][query, gallery], value[metric][reference, reference]
    verdict = {"generation": query, "earlier": gallery, "metric": metric, "cross": cross, "earlier_self": own,
               "margin": cross - own, "compatible": decision.reaches(cross, own)}
    if gallery != reference:
        verdict["self_of"] = reference
    if intervals:
        low, high = decision.paired_interval(reps[cross_cell][metric], reps[self_cell][metric])
        verdict.update(margin_interval=[low, high],
                       interval_excludes_zero=decision.side_of_zero(low, high) in ("above", "below"))
    verdict["margins"] = {}
    for name in decision.verdict_metrics(metric):
        margin = {"cross": value[name][query, gallery], "self": value[name][reference, reference]}
        margin["margin"] = margin["cross"] - margin["self"]
        if intervals:
            margin["interval"] = list(decision.paired_interval(reps[cross_cell][name], reps[self_cell][name]))
        verdict["margins"][name] = margin
    return verdict


def check_sizes(names, sizes):
    """Every generation must make embeddings of one size."""
    for name, size in zip(names, sizes):
        require(size == sizes[0], f"generations {names[0]} and {name} make {sizes[0]}-d and {size}-d embeddings; "
                                  "compatibility needs equal sizes")
