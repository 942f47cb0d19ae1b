"""The demo's forward-compatibility rows: the independent new model with a gallery transform of the old gallery.

Run by the demo's stages (:mod:`tools.demo.stages`) once the old and the independent model are
evaluated: the independent model embeds its own training split (step 2 with the new model), each
transform is fitted on (old feature, new feature) pairs of that split, the old model's IJB-C-style embeddings
are mapped with it and searched by the independent model's queries (``ijbc_eval`` ``--transform``).
The cost of each path is measured here: transforming features (per million, on this machine)
against re-embedding the gallery with the new model (a backfill: the new model's forward pass per
million crops, decoding and alignment excluded).
"""
import os
import time

import numpy as np

from tools.demo.commands import with_config
from utils.scenarios import sd_name

LABELS = {"linear": "linear", "procrustes": "Procrustes", "fct": "FCT"}
FCT_DEMO_EPOCHS = {"full": 10, "quick": 2}   # published: 80 (at 1,024 pairs a step: 6 steps an epoch here)
TIMED_ROWS = 1 << 14                          # features transformed to time a kind (the gallery, repeated)
TIMED_IMAGES = 1024                           # crops embedded to time a backfill


def transform_paths(pipe, demo, out, old_embeddings, cross_embeddings, new_run, resamples, quick=False):
    """Fit, apply and evaluate the three transforms; returns ``([(row name, [(test, result, result file), …]), …],
    cost)`` (each result file holds the figures of every resample, for the margins of
    :func:`tools.demo.report.result_rows`).

    ``old_embeddings``: the old model's saved IJB embeddings (``embs``/``embs_f``); ``cross_embeddings``:
    the independent model's cross-test file (its embeddings and the old ones); ``new_run``: its run
    folder name. ``cost``: seconds per million features of each kind, fit seconds (the stage's, 0 when reused), and the backfill's
    seconds per million images.
    """
    from tools.ijbc_eval.ijbc_eval import evaluate

    feature_dir = os.path.dirname(demo.feature("feature"))
    sd_new = sd_name(demo.EMBEDDING_SIZE, new_run, "arc", demo.FEATURE_SPLIT)
    new_features = demo.feature("feature", sd_new)
    pipe.stage("new_features", with_config(demo, ["tools/get_feature/get_feature.py", "--SD", sd_new, "--output",
                                                  feature_dir], "independent"), done_when=[new_features])
    folder = os.path.join(out, "transforms")
    named, cost = [], {"seconds_per_million": {}, "fit_seconds": {}}
    for kind, label in LABELS.items():
        path = os.path.join(folder, f"{kind}.pt")
        epochs = ["--epochs", str(FCT_DEMO_EPOCHS["quick" if quick else "full"])] if kind == "fct" else []
        pipe.stage(f"fit_{kind}", ["tools/transform/fit_transform.py", "--old", demo.feature("feature"),
                                   "--new", new_features, "--kind", kind, "-o", path, *epochs], done_when=[path])
        cost["fit_seconds"][kind] = pipe.seconds[f"fit_{kind}"]
        started = time.time()
        print(f"[eval_transform_{kind}] running …", flush=True)
        cost["seconds_per_million"][kind] = round(seconds_per_million(path, old_embeddings), 3)
        options = dict(restore_embs=cross_embeddings, transform=path, data_path=demo.DATA, resamples=resamples,
                       plot=False, verbose=False)
        files = [os.path.join(out, "eval", f"{new_run}_{kind}_{'1N' if n else '11'}.npz") for n in (False, True)]
        named.append((f"independent + {label}", [("cross", evaluate(one_to_n=n, save_result=file, **options), file)
                                                 for n, file in zip((False, True), files)]))
        pipe.seconds[f"eval_transform_{kind}"] = round(time.time() - started, 1)
        print(f"[eval_transform_{kind}] done in {pipe.seconds[f'eval_transform_{kind}']:.1f} s", flush=True)
    cost["backfill_seconds_per_million"] = round(backfill_seconds_per_million(demo, out, new_run), 1)
    return named, cost


def seconds_per_million(path, embeddings):
    """Seconds to transform a million features, timed on :data:`TIMED_ROWS` of the saved gallery's rows
    (repeated when it has fewer)."""
    from tools.transform import transforms
    from utils.io import safe_np_load

    model, _ = transforms.load(path)
    with safe_np_load(embeddings) as saved:
        rows = np.concatenate([saved["embs"], saved["embs_f"]])
    rows = np.resize(rows, (TIMED_ROWS, rows.shape[1]))
    start = time.perf_counter()
    transforms.transform_rows(model, rows)
    return (time.perf_counter() - start) / len(rows) * 1e6


def backfill_seconds_per_million(demo, out, new_run):
    """Seconds for the new model to embed a million crops (forward pass on uint8 crops at its input size)."""
    import torch

    from backbones import load_backbone
    from utils.embedding import ModelRunner

    model = load_backbone(os.path.join(out, new_run, "model.pt"), demo.NEW_NETWORK, demo.NEW_WIDTH, demo.INPUT_SIZE)
    runner = ModelRunner(model, "cpu", amp=False)
    crops = torch.randint(0, 256, (TIMED_IMAGES, 3, demo.INPUT_SIZE, demo.INPUT_SIZE), dtype=torch.uint8)
    start = time.perf_counter()
    for batch in crops.split(256):
        runner(batch)
    return (time.perf_counter() - start) / TIMED_IMAGES * 1e6


def cost_lines(cost):
    """Markdown lines stating the measured cost of each path."""
    per = cost["seconds_per_million"]
    return ("\nUpgrade cost on this machine: transforming a stored gallery takes "
            + ", ".join(f"{per[k]:.2f} s ({LABELS[k]})" for k in LABELS)
            + f" per million features; a backfill (re-embedding it with the new model, forward pass only) "
            f"{cost['backfill_seconds_per_million']:.0f} s per million images. Fitting (the stage, start-up included): "
            + ", ".join((f"{cost['fit_seconds'][k]:.0f} s" if cost["fit_seconds"][k] else "reused") + f" ({LABELS[k]})"
                        for k in LABELS) + ".\n")
