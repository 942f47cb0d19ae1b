"""Is my new model compatible with my deployed one? A compatibility matrix on your own face crops.

    python tools/compat_eval/compat_eval.py --data ROOT --models v1.pt v2.pt v3.pt --networks r18 r50 r50 -R out/compat
    python tools/compat_eval/compat_eval.py --rec PREFIX --models v1.pt v2.onnx -R out/compat -E
    python tools/compat_eval/compat_eval.py --restore_embs out/compat.npz -R out/compat2

Data: aligned crops as ``ROOT/<identity>/<image>`` (jpg/png) or a RecordIO set (``PREFIX.rec/.idx``).
Models: generations oldest first. Every image is embedded once per model; for every ordered pair
(query generation, gallery generation) the tool reports 1:1 TAR@FAR and AUC, 1:N top-k and
TPIR@FPIR, with bootstrap 95 % intervals over identities, the matrix of the main metric and a
verdict per later generation (with 3+ generations also Average Compatibility and Average
Multi-model accuracy); ``--backfill`` adds the curves of a gallery re-extracted bit by bit
(:mod:`tools.compat_eval.backfill`). Writes ``PATH.json``, ``PATH.md``, ``PATH.png`` (and
``PATH_backfill.png`` with ``--backfill``, ``PATH.npz`` with ``-E``). See docs/compat.md.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tools.compat_eval import backfill
from tools.ijbc_eval import bootstrap, metrics
from tools.pack_rec import list_identities
from utils.errors import ArgumentParser, UserError, require, run_cli
from utils.io import atomic_np_savez, atomic_open, atomic_path, numpy_read_errors, safe_np_load

FEATURE_VARIANT = "N1D0F1"      # image feature: embedding + mirrored-image embedding, L2-normalised
FAR_KEYS = ("1e-5", "1e-4", "1e-3", "1e-2", "1e-1")
FPIR_KEYS = ("1e-2", "1e-1")
TOPK = (1, 5)
METRICS = tuple(f"TAR@FAR={k}" for k in FAR_KEYS) + ("AUC",) + tuple(f"top{k}" for k in TOPK) \
    + tuple(f"TPIR@FPIR={k}" for k in FPIR_KEYS)
SEARCH_BLOCK = 1 << 25          # similarity entries per block of the exact 1:N search (128 MB of float32)
PROBE_ROWS = 2048               # probes per block of the search (the gallery is cut in chunks to fit the block)
SEARCH_DEPTH = 8                # gallery columns listed per probe: ranks are exact below it (top-k for k < 8)
READ_OK, READ_FAILED, WRONG_SIZE = 0, 1, 2


# ------------------------------------------------------------------------------------------- data
class FaceSet(Dataset):
    """Aligned face crops of an image folder or a RecordIO set: ``labels``, ``names`` (for messages).

    ``ds[i] → (uint8 crops 3×S×S, one per size, index, status, height, width)``; an unreadable image
    or one of the wrong size (without ``resize``) gives zero crops and its status; the caller reports it.
    """

    def __init__(self, data=None, rec=None, image_size=112, resize=False, sizes=(112,)):
        self.image_size, self.resize, self.sizes = image_size, resize, tuple(sizes)
        self.record = None
        if rec is not None:
            from utils.dataset import MXFaceDataset

            faces = MXFaceDataset(rec, train=False)
            self.record, self.keys, self.offsets = faces.record, faces.keys, faces.offsets
            self.labels = faces.labels
            self.names = np.array([f"{faces.rec_path} image key {k}" for k in self.keys.tolist()])
            self.source = faces.rec_path
            identities = np.unique(self.labels).astype(str)
        else:
            identities, files, self.labels = list_identities(data, f"--data {data}")
            self.names, self.source = np.array(files), data
        require(len(identities) >= 2, f"{self.source}: {len(identities)} identity found ({', '.join(identities)}); "
                                      "compatibility testing needs at least 2 identities")
        self.identities = identities

    def __len__(self):
        return len(self.labels)

    def _read(self, index):
        if self.record is None:
            return cv2.imread(str(self.names[index]), cv2.IMREAD_COLOR)
        from utils.recordio import unpack

        payload = self.record.read_at(int(self.offsets[index]), int(self.keys[index]))
        try:
            data = np.frombuffer(unpack(payload)[1], np.uint8)
            return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        except (UserError, cv2.error):
            return None

    def __getitem__(self, index):
        bgr = self._read(index)
        height, width = bgr.shape[:2] if bgr is not None else (0, 0)
        status = READ_FAILED if bgr is None else WRONG_SIZE \
            if not self.resize and (height, width) != (self.image_size, self.image_size) else READ_OK
        crops = []
        for size in self.sizes:
            if status != READ_OK:
                crops.append(np.zeros((3, size, size), np.uint8))
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if rgb.shape[:2] != (size, size):
                rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
            crops.append(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return tuple(torch.from_numpy(c) for c in crops), index, status, height, width

    def problem(self, index, status, height, width):
        """The one-line message for an image that could not be used."""
        name = self.names[index]
        if status == READ_FAILED:
            return f"cannot read image {name} (expected a JPEG or PNG file)"
        return (f"{name} is {width}×{height} pixels, expected {self.image_size}×{self.image_size} aligned "
                f"crops (pass --resize to resize every image, or --image_size to expect another size)")


# ----------------------------------------------------------------------------------------- models
def build_embedders(models, networks, widths, input_sizes, device, preprocessings=None):
    """One :class:`tools.ijbc_eval.embed.Embedder` per generation (the toolkit's model runner; a
    toolkit backbone in AMP fp16 on CUDA)."""
    from tools.ijbc_eval.embed import Embedder

    preprocessings = preprocessings or [None] * len(models)
    return [Embedder(*arguments, device, p, amp=True) for *arguments, p in zip(models, networks, widths, input_sizes,
                                                                               preprocessings)]


def embed(faceset, embedders, batch_size=128, num_workers=2):
    """``[(embs, embs_f), …]`` per embedder (float32, dataset order), all models in one pass over the images."""
    outputs = [(np.empty((len(faceset), e.embedding_size), np.float32),
                np.empty((len(faceset), e.embedding_size), np.float32)) for e in embedders]
    loader = DataLoader(faceset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=_init_worker, pin_memory=any(e.device.type == "cuda" for e in embedders))
    for crops, index, status, height, width in tqdm(loader, desc="embedding", unit="batch", mininterval=5):
        bad = np.flatnonzero(status.numpy() != READ_OK)
        if len(bad):
            b = bad[0]
            raise UserError(faceset.problem(int(index[b]), int(status[b]), int(height[b]), int(width[b])))
        rows = index.numpy()
        for (embs, embs_f), embedder in zip(outputs, embedders):
            embs[rows], embs_f[rows] = embedder(crops[faceset.sizes.index(embedder.input_size)])
    return outputs


def _init_worker(_):
    cv2.setNumThreads(1)


def image_features(embs, embs_f, flip=True):
    """Image features as the IJB evaluation forms them (:data:`FEATURE_VARIANT`; without the mirror
    image for a deployed model stated ``no_flip``), float32."""
    return metrics.image_features(embs, embs_f, None, FEATURE_VARIANT if flip else FEATURE_VARIANT[:-1] + "0")


# --------------------------------------------------------------------------------------- protocol
def unrank_pairs(ranks):
    """Pairs ``(i, j)``, i < j, of the ``ranks`` in the order (0,1), (0,2), (1,2), (0,3), …"""
    ranks = np.asarray(ranks, np.int64)
    j = np.floor((1 + np.sqrt(1 + 8 * ranks.astype(np.float64))) / 2).astype(np.int64)
    j -= j * (j - 1) // 2 > ranks                  # float rounding, either way
    j += (j + 1) * j // 2 <= ranks
    return ranks - j * (j - 1) // 2, j


def verification_pairs(labels, max_genuine=None, impostors=1_000_000, seed=0):
    """``(first, second, genuine)`` image pairs: all (or ``max_genuine`` sampled) genuine pairs and
    ``impostors`` sampled impostor pairs (all of them when fewer exist), sorted, deterministic for ``seed``."""
    rng = np.random.default_rng([seed, 1])
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    per_identity = sizes * (sizes - 1) // 2
    total_genuine = int(per_identity.sum())
    ranks = np.arange(total_genuine) if max_genuine is None or max_genuine >= total_genuine \
        else np.sort(rng.choice(total_genuine, max_genuine, replace=False))
    identity = np.searchsorted(np.cumsum(per_identity), ranks, "right")
    i, j = unrank_pairs(ranks - (np.cumsum(per_identity) - per_identity)[identity])
    genuine = np.stack([order[starts[identity] + i], order[starts[identity] + j]], 1)

    total = len(labels) * (len(labels) - 1) // 2
    wanted = min(impostors, total - total_genuine)
    draw = np.arange(total) if wanted >= total - total_genuine else \
        np.sort(rng.choice(total, min(total, int(wanted * total / (total - total_genuine) * 1.2) + 1000),
                           replace=False))
    a, b = unrank_pairs(draw)
    different = labels[a] != labels[b]
    keep = np.flatnonzero(different)
    if len(keep) > wanted:
        keep = np.sort(rng.choice(keep, wanted, replace=False))
    impostor = np.stack([a[keep], b[keep]], 1)
    pairs = np.concatenate([np.sort(genuine, 1), impostor])
    return pairs[:, 0], pairs[:, 1], np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]


def identification_split(labels, gallery_per_id=1, nonmated_share=0.1, seed=0):
    """``(gallery image mask, probe image mask, mated identities)`` of the open-set 1:N protocol.

    A share ``nonmated_share`` of the identities (at least one) is held out of the gallery: all
    their images are non-mated probes. Every other identity enrols ``gallery_per_id`` random images
    (one gallery template); its other images are mated probes.
    """
    rng = np.random.default_rng([seed, 2])
    labels = np.asarray(labels)
    identities = np.unique(labels)
    held_out = max(1, int(round(nonmated_share * len(identities)))) if nonmated_share > 0 else 0
    require(held_out < len(identities), f"--nonmated_share {nonmated_share} leaves no identity for the gallery")
    mated_identities = np.sort(rng.permutation(identities)[held_out:])
    in_gallery_identity = np.isin(labels, mated_identities)
    order = np.lexsort((rng.random(len(labels)), labels))         # random order inside each identity
    place = np.empty(len(labels), np.int64)
    _, starts = np.unique(labels[order], return_index=True)
    place[order] = np.arange(len(labels)) - np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
    gallery = in_gallery_identity & (place < gallery_per_id)
    return gallery, ~gallery, mated_identities


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


# ----------------------------------------------------------------------------------------- report
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
    for q, query in enumerate(features):
        for g, gallery in enumerate(features):
            figures, reps[q, g] = protocol.cell(query, gallery, counts)
            cell = {"query": names[q], "gallery": names[g], **figures}
            if counts is not None:
                cell["interval"] = bootstrap.percentile_intervals(reps[q, g])
            cells.append(cell)
    if transformed is not None:
        name, gallery, old, new = transformed
        figures, reps[new, name] = protocol.cell(features[new], gallery, counts)
        cells.append({"query": names[new], "gallery": name, "transform": True, **figures})
        if counts is not None:
            cells[-1]["interval"] = bootstrap.percentile_intervals(reps[new, name])
    value = {(c["query"], c["gallery"]): c[metric] for c in cells}
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
        grid = {(q, g): value[names[q], names[g]] for q in range(len(names)) for g in range(len(names))}
        result.update(backfill.generations_summary(names, grid, None if counts is None else
                                                   {key: reps[key][metric] for key in grid}))
    return result


def _verdict(value, reps, intervals, metric, query, gallery, reference, cross_cell, self_cell):
    """``query`` searching ``gallery`` against the self-test of ``reference`` (the earlier generation)."""
    cross, own = value[query, gallery], value[reference, reference]
    verdict = {"generation": query, "earlier": gallery, "metric": metric, "cross": cross, "earlier_self": own,
               "margin": cross - own, "compatible": bool(cross >= own)}
    if gallery != reference:
        verdict["self_of"] = reference
    if intervals:
        difference = bootstrap.difference(reps[cross_cell][metric], reps[self_cell][metric])
        low, high = bootstrap.percentile_intervals(difference)
        verdict.update(margin_interval=[low, high], interval_excludes_zero=bool(low > 0 or high < 0))
    return verdict


def format_report(result):
    """Markdown: the matrix of the main metric, every figure per cell, the verdicts."""
    names, metric = result["generations"], result["metric"]
    cell = {(c["query"], c["gallery"]): c for c in result["cells"]}

    def show(c, key):
        interval = c.get("interval", {}).get(key)
        return f"{c[key]:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")

    p = result["protocol"]
    lines = [f"Compatibility matrix, {metric} (rows: query generation, columns: gallery generation"
             + (f"; 95 % bootstrap intervals over identities, {result['bootstrap']} resamples" if result["bootstrap"]
                else "") + ")", "",
             "| query \\ gallery | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {q} | " + " | ".join(show(cell[q, g], metric) for g in names) + " |" for q in names]
    lines += ["", f"{p['images']} images of {p['identities']} identities; 1:1: {p['genuine_pairs']} genuine / "
              f"{p['impostor_pairs']} impostor pairs; 1:N: {p['gallery_identities']} gallery identities "
              f"({p['gallery_images']} images), {p['mated_probes']} mated / {p['nonmated_probes']} non-mated probes.",
              "", "| query | gallery | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    lines += [f"| {c['query']} | {c['gallery']} | " + " | ".join(f"{c[k]:.4f}" for k in METRICS) + " |"
              for c in result["cells"]]
    if result["verdicts"]:
        lines += ["", f"Verdicts ({metric}: a later generation is compatible with an earlier one when its "
                  "cross-test reaches the earlier model's self-test):", ""]
    for v in result["verdicts"]:
        line = (f"- {v['generation']} → {v['earlier']}: {'compatible' if v['compatible'] else 'NOT compatible'}, "
                f"cross {v['cross']:.4f} vs {v.get('self_of', v['earlier'])} self {v['earlier_self']:.4f}, "
                f"margin {v['margin']:+.4f}")
        if "margin_interval" in v:
            low, high = v["margin_interval"]
            line += (f", 95 % interval [{low:+.4f}, {high:+.4f}] "
                     + ("excludes 0" if v["interval_excludes_zero"] else "includes 0 (not significant)"))
        lines.append(line)
    if "average_compatibility" in result:
        def interval(key):
            return f" [{result[key + '_ci_low']:.4f}, {result[key + '_ci_high']:.4f}]" if key + "_ci_low" in result else ""

        lines += ["", f"Across the {len(names)} generations ({metric}): Average Compatibility "
                  f"{result['average_compatibility']:.4f}{interval('average_compatibility')}, Average Multi-model "
                  f"accuracy {result['average_multimodel_accuracy']:.4f}{interval('average_multimodel_accuracy')}; "
                  "oldest generation each one is compatible with: "
                  + ", ".join(f"{k} → {v}" for k, v in result["oldest_compatible"].items())]
    text = "\n".join(lines) + "\n"
    return text + backfill.format_backfill(result["backfill"], metric) if result.get("backfill") else text


def plot_matrix(result, path):
    """Heatmap PNG of the main metric (rows: query, columns: gallery), values written in the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, metric = result["generations"], result["metric"]
    value = {(c["query"], c["gallery"]): c[metric] for c in result["cells"]}
    grid = np.array([[value[q, g] for g in names] for q in names])
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 1.1 * len(names) + 1.2))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="gallery generation", ylabel="query generation", title=metric)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- command
def _per_model(values, count, option, cast):
    """One value per model from ``values`` (one per model, or one for all)."""
    require(len(values) in (1, count), f"{option}: give one value per model ({count}) or one for all, "
                                       f"got {len(values)}")
    try:
        return [cast(v) for v in (values * count if len(values) == 1 else values)]
    except ValueError:
        raise UserError(f"{option}: expected {cast.__name__} values, got {' '.join(map(str, values))}") from None


def restore(path, faceset=None):
    """``(names, labels, [(embs, embs_f), …])`` saved with ``-E``; checked against the data when given."""
    data = safe_np_load(path)
    require(hasattr(data, "files") and "generations" in data.files and "labels" in data.files,
            f"{path}: not a compat_eval result saved with -E (expected an .npz with 'generations' and 'labels')")
    with data, numpy_read_errors(path):
        names = [str(n) for n in data["generations"]]
        labels = data["labels"].astype(np.int64)
        missing = [k for i in range(len(names)) for k in (f"embs{i}", f"embs_f{i}") if k not in data.files]
        require(not missing, f"{path}: missing arrays {', '.join(missing)}")
        embeddings = [(data[f"embs{i}"], data[f"embs_f{i}"]) for i in range(len(names))]
    for i, (embs, embs_f) in enumerate(embeddings):
        require(embs.ndim == 2 and embs.shape == embs_f.shape and len(embs) == len(labels),
                f"{path}: embs{i}/embs_f{i} must be two {len(labels)}-row matrices of one shape")
    if faceset is not None:
        require(np.array_equal(labels, faceset.labels),
                f"{path}: its {len(labels)} images and labels differ from {faceset.source} (embeddings of another set?)")
    return names, labels, embeddings


def check_sizes(names, sizes):
    """Every generation must make embeddings of one size."""
    for name, size in zip(names, sizes):
        require(size == sizes[0], f"generations {names[0]} and {name} make {sizes[0]}-d and {size}-d embeddings; "
                                  "compatibility needs equal sizes")


def preprocessings(texts, count):
    """Each generation's :class:`utils.deployed.Preprocessing` from ``--preprocess`` (one per model, or one)."""
    from utils.deployed import IJB_PREPROCESSING, parse_preprocessing

    return [parse_preprocessing(t, IJB_PREPROCESSING) for t in _per_model(texts or [""], count, "--preprocess", str)]


def transformed_gallery(args, names, embeddings, flips):
    """``(name, image features, old index, new index)`` of the old generation mapped by ``--transform``."""
    from tools.ijbc_eval.ijbc_eval import apply_transform
    from tools.transform.transforms import load

    old, new = (_generation(names, g) for g in args.transform_generations or (names[0], names[-1]))
    require(old != new, f"--transform_generations: give two different generations, got {names[old]} twice")
    mapped = apply_transform(args.transform, embeddings[old], embeddings[new][0].shape[1])
    return f"{names[old]} + {load(args.transform)[1]['kind']}", image_features(*mapped, flips[old]), old, new


def _generation(names, text):
    """Index of a generation given by name or 1-based position."""
    if text in names:
        return names.index(text)
    require(text.isdigit() and 1 <= int(text) <= len(names),
            f"--transform_generations: {text} is neither a generation name ({', '.join(names)}) nor a position 1..{len(names)}")
    return int(text) - 1


def _default_names(models):
    stems = [os.path.splitext(os.path.basename(m))[0] for m in models]
    return stems if len(set(stems)) == len(stems) else [f"gen{i + 1}" for i in range(len(models))]


def run(args):
    """The command: data → embeddings → protocol → matrix; returns the result dict."""
    require((args.data is None) != (args.rec is None) or args.restore_embs,
            "give the faces as --data ROOT or --rec PREFIX (exactly one), or --restore_embs PATH.npz")
    require(not (args.data and args.rec), "give --data or --rec, not both")
    require(bool(args.models) != bool(args.restore_embs), "give --models (oldest first) or --restore_embs, not both")
    require(not args.save_embeddings or not args.restore_embs, "-E saves embeddings made from --models")
    require(args.bootstrap >= 0, f"--bootstrap must be >= 0, got {args.bootstrap}")
    require(args.impostors >= 1 and (args.max_genuine is None or args.max_genuine >= 1) and args.gallery_per_id >= 1,
            "--impostors, --max_genuine and --gallery_per_id must be >= 1")
    require(0 <= args.nonmated_share < 1, f"--nonmated_share must lie in [0, 1), got {args.nonmated_share}")
    require(args.backfill is not None or not args.backfill_order, "--backfill_order needs --backfill")
    stem = args.save_result[:-len(".json")] if args.save_result.endswith(".json") else args.save_result
    if args.models:
        count = len(args.models)
        networks = _per_model(args.networks, count, "--networks", str)
        widths = _per_model(args.widths, count, "--widths", int)
        sizes = _per_model(args.input_sizes, count, "--input_sizes", int)
        names = args.names or _default_names(args.models)
        require(len(names) == count and len(set(names)) == count,
                f"--names: give {count} distinct names, got {' '.join(names)}")
        faceset = FaceSet(args.data, args.rec, args.image_size, args.resize, sorted(set(sizes)))
        embedders = build_embedders(args.models, networks, widths, sizes, args.device,
                                    preprocessings(args.preprocess, count))
        check_sizes(args.models, [e.embedding_size for e in embedders])
        embeddings = embed(faceset, embedders, args.batch_size,
                           min(4, os.cpu_count() or 1) if args.num_workers is None else args.num_workers)
        labels = faceset.labels
    else:
        faceset = FaceSet(args.data, args.rec, args.image_size, args.resize) if args.data or args.rec else None
        names, labels, embeddings = restore(args.restore_embs, faceset)
        if args.names:
            require(len(args.names) == len(names), f"--names: {args.restore_embs} holds {len(names)} generations")
            names = args.names
    identity_names, labels = np.unique(labels, return_inverse=True)
    if faceset is not None:
        identity_names = faceset.identities
    pair = backfill.check_pair(names, args.backfill) if args.backfill is not None else None
    file_order = backfill.read_order(args.backfill_order, identity_names, args.seed) if args.backfill_order else None
    flips = [p.flip_sum for p in preprocessings(args.preprocess, len(names))]
    features = [image_features(*e, flip) for e, flip in zip(embeddings, flips)]
    require(all(np.isfinite(f).all() for f in features), "the embeddings contain NaN or inf")
    protocol = Protocol(labels, args.max_genuine, args.impostors, args.gallery_per_id, args.nonmated_share, args.seed)
    transformed = transformed_gallery(args, names, embeddings, flips) if args.transform else None
    result = compatibility(features, names, protocol, args.bootstrap, args.seed, args.metric, transformed)
    result["models"] = list(args.models) if args.models else args.restore_embs
    result["transform"] = args.transform
    if pair is not None:
        old, new = pair
        orders = {"random": backfill.random_order(len(identity_names), args.seed),
                  "norm": backfill.norm_order(embeddings[old][0] + embeddings[old][1], labels, protocol.gallery_images)}
        if file_order is not None:
            orders["file"] = file_order
        counts = bootstrap.subject_counts(len(identity_names), args.bootstrap, args.seed) if args.bootstrap else None
        result["backfill"] = backfill.backfill_curves(protocol, features[old], features[new], orders,
                                                      [names[old], names[new]], counts, args.backfill_merge,
                                                      backfill.flip_far(args.metric), args.seed)
    if args.save_embeddings:
        atomic_np_savez(stem + ".npz", generations=np.array(names), labels=faceset.labels,
                        **{f"embs{i}": e[0] for i, e in enumerate(embeddings)},
                        **{f"embs_f{i}": e[1] for i, e in enumerate(embeddings)})
    report = format_report(result)
    with atomic_open(stem + ".json") as handle:
        json.dump(result, handle, indent=1)
    with atomic_open(stem + ".md") as handle:
        handle.write(report)
    plot_matrix(result, stem + ".png")
    if pair is not None:
        backfill.plot_backfill(result["backfill"], stem + "_backfill.png", args.metric)
    print(report)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png" + (f", {stem}_backfill.png" if pair is not None else "")
          + (f", {stem}.npz" if args.save_embeddings else ""))
    return result


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="ROOT", help="aligned crops as ROOT/<identity>/<image> (jpg/png)")
    p.add_argument("--rec", metavar="PREFIX", help="RecordIO set PREFIX.rec/.idx (or a folder with train.rec)")
    p.add_argument("--models", nargs="+", default=[], help="model generations, oldest first (.pt state_dict or .onnx)")
    p.add_argument("--networks", nargs="+", default=["r50"], help="backbone per model, or one for all (default r50)")
    p.add_argument("--widths", nargs="+", default=["64"], help="backbone width per model, or one (default 64)")
    p.add_argument("--input_sizes", nargs="+", default=["112"], help="input size per model, or one (default 112)")
    p.add_argument("--names", nargs="+", help="generation names (default: the model file names)")
    p.add_argument("--image_size", type=int, default=112, help="expected crop size (default 112)")
    p.add_argument("--resize", action="store_true", help="resize images of any size instead of refusing them")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sampling, gallery split and bootstrap")
    p.add_argument("--max_genuine", type=int, default=None, help="sample this many genuine pairs (default: all)")
    p.add_argument("--impostors", type=int, default=1_000_000, help="impostor pairs sampled (default 1,000,000)")
    p.add_argument("--gallery_per_id", type=int, default=1, help="images enrolled per gallery identity (default 1)")
    p.add_argument("--nonmated_share", type=float, default=0.1,
                   help="share of identities held out of the gallery as non-mated probes (default 0.1)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of identities (0: no intervals)")
    p.add_argument("--metric", default="TAR@FAR=1e-4", help=f"main metric: one of {', '.join(METRICS)}")
    p.add_argument("--backfill", nargs="*", metavar="GEN",
                   help="backfill curves: OLD NEW generation names (default: the last two); docs/compat.md")
    p.add_argument("--backfill_order", metavar="FILE",
                   help="also the order of FILE: one identity name per line, first re-extracted first")
    p.add_argument("--backfill_merge", nargs="+", choices=backfill.MERGES, default=list(backfill.MERGES),
                   help="merges of the two score scales in the mixed gallery (default: both)")
    p.add_argument("-R", "--save_result", default=os.path.join(ROOT, "work_dirs", "compat", "compat"), metavar="PATH",
                   help="write PATH.json, PATH.md, PATH.png (default work_dirs/compat/compat)")
    p.add_argument("-E", "--save_embeddings", action="store_true", help="also write the embeddings to PATH.npz")
    p.add_argument("--restore_embs", metavar="PATH.npz", help="evaluate embeddings saved with -E instead of models")
    p.add_argument("-b", "--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=None, help="image loading workers (default min(4, CPUs))")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preprocess", nargs="+", metavar="SPEC",
                   help="input of each model (one per model, or one): mean=V[/V/V],std=V[/V/V] (or scale=V),"
                        "rgb|bgr,flip_sum|no_flip (default mean=127.5,scale=0.0078125,rgb,flip_sum; "
                        "docs/features.md)")
    p.add_argument("--transform", metavar="H.pt", help="gallery transform (tools/transform): adds the cell new "
                                                       "queries vs the transformed old gallery, and its verdict")
    p.add_argument("--transform_generations", nargs=2, metavar=("OLD", "NEW"),
                   help="the generations the transform maps from and to (names or positions; default first, last)")
    return p


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
