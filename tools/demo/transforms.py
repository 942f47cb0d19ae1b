"""The demo's forward-compatibility rows: the independent new model with a gallery transform of the old gallery.

Run by the demo's stages (:mod:`tools.demo.stages`) once the old and the independent model are
evaluated: the independent model (of each seed) embeds its own training split (step 2 with the new
model), each transform is fitted on (old feature, new feature) pairs of that split with
``fit_transform.py`` (a fifth of the identities held out to measure the fit; FCT stops on them), the
old model's IJB-C-style embeddings are mapped with it and searched by the independent model's queries
(``ijbc_eval`` ``--transform``).
The cost of each path is measured here: transforming features (per million, on this machine)
against re-embedding the gallery with the new model (a backfill: the new model's forward pass per
million crops, decoding and alignment excluded).
"""
import os
import time

import numpy as np

from tools.demo.commands import with_config
from utils.errors import require
from utils.scenarios import sd_name

NAMES = {"linear": "linear", "procrustes": "Procrustes", "fct": "FCT"}
LABELS = dict(NAMES, fct="FCT (no side information)")   # the table's rows: ml-fct's released configs use side information
FCT_QUICK_STEPS = 200        # the quick profile's FCT budget (the full one: fit_transform's default recipe)
TIMED_ROWS = 1 << 14                          # features transformed to time a kind (the gallery, repeated)
TIMED_IMAGES = 1024                           # crops embedded to time a backfill


def transform_paths(pipe, demo, out, old_embeddings, resamples, seeds=1, quick=False):
    """Fit, apply and evaluate the three transforms for each seed's independent model; returns ``([(row
    name, [(test, result, result file), …]), …], cost)``, one entry per seed and kind (rows of one
    name are combined over the seeds by :func:`tools.demo.report.combine_seeds`; each result file holds
    the figures of every resample, for the margins of :func:`tools.demo.report.result_rows`).

    ``old_embeddings``: the old model's saved IJB embeddings (``embs``/``embs_f``). ``cost``: seconds per
    million features of each kind, fit seconds (the first seed's stage, 0 when reused), the backfill's
    seconds per million images, and each kind's held-out fit (:func:`tools.transform.transforms.fit_measured`)
    of every seed.
    """
    named, cost = [], {"seconds_per_million": {}, "fit_seconds": {}, "heldout": {kind: [] for kind in LABELS}}
    for seed in range(seeds):
        named += seeded_paths(pipe, demo.seeded(seed), out, old_embeddings, resamples, cost, quick)
    cost["backfill_seconds_per_million"] = round(backfill_seconds_per_million(demo, out, demo.run_name("independent", 0)), 1)
    return named, cost


def seeded_paths(pipe, demo, out, old_embeddings, resamples, cost, quick):
    """:func:`transform_paths` for the independent model of ``demo``'s seed (fitted with that seed):
    its features of its training split, each transform fitted, timed and evaluated."""
    from tools.ijbc_eval.ijbc_eval import evaluate
    from tools.transform import transforms

    seed, new_run = demo.SEED_INDEX, demo.run_name("independent")
    suffix = f"_seed{seed}" if seed else ""
    feature_dir = os.path.dirname(demo.feature("feature"))
    sd_new = sd_name(demo.EMBEDDING_SIZE, new_run, "arc", demo.FEATURE_SPLIT)
    new_features = demo.feature("feature", sd_new)
    pipe.stage(f"new_features{suffix}", with_config(demo, ["tools/get_feature/get_feature.py", "--SD", sd_new,
                                                           "--output", feature_dir], "independent"),
               done_when=[new_features])
    folder, named = os.path.join(out, "transforms"), []
    for kind, label in LABELS.items():
        path, stage = os.path.join(folder, f"{kind}{suffix}.pt"), f"fit_{kind}{suffix}"
        steps = ["--steps", str(FCT_QUICK_STEPS)] if kind == "fct" and quick else []
        pipe.stage(stage, ["tools/transform/fit_transform.py", "--old", demo.feature("feature"), "--new", new_features,
                           "--kind", kind, "-o", path, "--seed", str(seed), *steps], done_when=[path])
        heldout = transforms.load(path)[1].get("heldout")
        require(heldout, f"{path}: fitted without a held-out split (an older transform file); delete it to refit")
        cost["heldout"][kind].append(heldout)
        started = time.time()
        print(f"[eval_transform_{kind}{suffix}] running …", flush=True)
        if not seed:
            cost["fit_seconds"][kind] = pipe.seconds[stage]
            cost["seconds_per_million"][kind] = round(seconds_per_million(path, old_embeddings), 3)
        options = dict(restore_embs=os.path.join(out, "eval", f"{new_run}_cross_embs.npz"), transform=path,
                       data_path=demo.DATA, resamples=resamples, plot=False, verbose=False)
        files = [os.path.join(out, "eval", f"{new_run}_{kind}_{'1N' if n else '11'}.npz") for n in (False, True)]
        named.append((f"independent + {label}", [("cross", evaluate(one_to_n=n, save_result=file, **options), file)
                                                 for n, file in zip((False, True), files)]))
        pipe.seconds[f"eval_transform_{kind}{suffix}"] = round(time.time() - started, 1)
        print(f"[eval_transform_{kind}{suffix}] done in {pipe.seconds[f'eval_transform_{kind}{suffix}']:.1f} s",
              flush=True)
    return named


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
    """Markdown lines stating each transform's held-out fit (mean over the seeds) and the measured cost of each path."""
    heldout = {kind: {key: float(np.mean([fit[key] for fit in fits])) for key in ("cosine", "mse", "zero_mse")}
               for kind, fits in cost["heldout"].items()}
    per = cost["seconds_per_million"]
    return ("\nUpgrade cost on this machine: transforming a stored gallery takes "
            + ", ".join(f"{per[k]:.2f} s ({NAMES[k]})" for k in NAMES)
            + f" per million features; a backfill (re-embedding it with the new model, forward pass only) "
            f"{cost['backfill_seconds_per_million']:.0f} s per million images. Fitting (the stage, start-up included): "
            + ", ".join((f"{cost['fit_seconds'][k]:.0f} s" if cost["fit_seconds"][k] else "reused") + f" ({NAMES[k]})"
                        for k in NAMES) + ".\n"
            + "\nHeld-out fit of each transform on a fifth of the identities of the independent model's training "
            "split, kept out of its fit (mean cosine of h(old) and the new feature; MSE per coordinate): "
            + ", ".join(f"{heldout[k]['cosine']:.3f} / {heldout[k]['mse']:.6f} ({NAMES[k]})" for k in NAMES)
            + f"; predicting zero: MSE {heldout['linear']['zero_mse']:.6f}.\n")
