"""The demo's backfill curves: new models re-extracting the old model's gallery of the IJB-C-style images.

The curves, flips and areas are compat_eval's (:mod:`tools.compat_eval.backfill`) on the demo's
IJB-C-style evaluation images, each image's identity being its template's subject.
"""
import json
import os

import numpy as np

from tools.compat_eval.backfill import backfill_curves, flip_far, format_backfill, norm_order, plot_backfill, random_order
from tools.compat_eval.data import image_features
from tools.compat_eval.protocol import Protocol
from tools.ijbc_eval import bootstrap
from utils.io import atomic_open, safe_np_load


def ijb_subjects(data_path):
    """``(images with a subject, their subjects)`` of an IJB-style set: each image's template's subject
    from the 1:N gallery and probe lists."""
    from tools.ijbc_eval.meta import load_meta

    meta = load_meta(data_path, one_to_n=True)
    lists = [*meta.galleries.values(), meta.probes]
    templates = np.concatenate([t["templates"] for t in lists])
    subjects = np.concatenate([t["subjects"] for t in lists])
    templates, first = np.unique(templates, return_index=True)
    pos = np.minimum(np.searchsorted(templates, meta.templates), len(templates) - 1)
    known = templates[pos] == meta.templates
    return np.flatnonzero(known), subjects[first][pos[known]]


def write_curves(data_path, old_embeddings, new_embeddings, out, resamples=20, metric="TAR@FAR=1e-3", seed=0):
    """The backfill curves of each new model of ``new_embeddings`` ({name: .npz with ``embs``, ``embs_f``,
    as ``ijbc_eval.py -E`` saves}) re-extracting the gallery of ``old_embeddings`` on the demo's
    IJB-C-style images (image features as in :mod:`~tools.compat_eval.data`, identities = subjects),
    random and norm orders, plain merge. Writes ``out/backfill.json``, ``backfill.md`` and
    ``backfill.png``; returns the report."""
    images, subjects = ijb_subjects(data_path)
    _, labels = np.unique(subjects, return_inverse=True)

    def load(path):
        with safe_np_load(path) as data:
            return data["embs"][images], data["embs_f"][images]

    old_raw = load(old_embeddings)
    old = image_features(*old_raw)
    protocol = Protocol(labels, impostors=100_000, seed=seed)
    counts = bootstrap.subject_counts(int(labels.max()) + 1, resamples, seed) if resamples else None
    orders = {"random": random_order(int(labels.max()) + 1, seed),
              "norm": norm_order(old_raw[0] + old_raw[1], labels, protocol.gallery_images)}
    entries = []
    for name, path in new_embeddings.items():
        entries += backfill_curves(protocol, old, image_features(*load(path)), orders, ["old", name], counts,
                                   ("plain",), flip_far(metric), seed)
    report = {"metric": metric, "protocol": protocol.summary(), "bootstrap": resamples, "backfill": entries}
    with atomic_open(os.path.join(out, "backfill.json")) as handle:
        json.dump(report, handle, indent=1)
    text = format_backfill(entries, metric)
    with atomic_open(os.path.join(out, "backfill.md")) as handle:
        handle.write(text)
    plot_backfill(entries, os.path.join(out, "backfill.png"), metric)
    return report
