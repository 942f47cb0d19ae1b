"""Fit a gallery transform h: old-model space → new-model space from the two models' features of one set.

    python tools/transform/fit_transform.py --old OLD_feature.npy --new NEW_feature.npy --kind fct -o h.pt
        [--heldout 0.2] [--seed 0] [--published] [--steps 2000 | --epochs E] [--inner_dim 512] [--batch_size 128]
        [--warmup 100] [--lr 5e-4] [--freeze_batchnorm 0] [--skip | --no-skip] [--eval_every N] [--patience 5]

``--old``/``--new``: N×d feature files of the same images in the same order (``get_feature.py`` run
with the old and with the new model on the new training set). When both have a ``<SD>_label.npy``
beside them, the labels must agree, and ``--heldout`` of the identities are kept out of fitting to
measure it (without labels, that share of the rows). Kinds: ``linear`` (least squares),
``procrustes`` (orthogonal), ``procrustes_scaled`` (centred, scaled and orthogonal), ``fct`` (the FCT
MLP, trained; ``--published``: ml-fct's released recipe, the other FCT options over it); see
docs/transform.md. Prints and stores in the file (``transforms.load(path)[1]["heldout"]``) the
held-out cosine and MSE of h, of the linear map and of predicting zero.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from tools.transform import transforms
from utils.errors import require, run_cli
from utils.io import safe_np_load


def _labels_of(path):
    """The ``_label.npy`` beside a ``_feature.npy`` file, or None."""
    if not path.endswith("_feature.npy"):
        return None
    labels = path[:-len("_feature.npy")] + "_label.npy"
    return labels if os.path.isfile(labels) else None


def load_pairs(old_path, new_path):
    """``(old, new, labels or None)``: the memory-mapped feature arrays, checked to describe the same
    images, and their labels when both have a ``_label.npy`` beside them."""
    old, new = safe_np_load(old_path, mmap_mode="r"), safe_np_load(new_path, mmap_mode="r")
    for path, rows in ((old_path, old), (new_path, new)):
        require(rows.ndim == 2 and rows.dtype.kind == "f", f"{path}: expected an N×d float feature array, "
                                                           f"got {rows.dtype} {rows.shape}")
    require(len(old) == len(new), f"{old_path} has {len(old)} rows but {new_path} has {len(new)}: the two "
                                  "models' features of the same images are needed, in the same order")
    paths = [_labels_of(p) for p in (old_path, new_path)]
    if not all(paths):
        return old, new, None
    labels = [safe_np_load(path, mmap_mode="r") for path in paths]
    require(np.array_equal(*labels), f"{paths[0]} and {paths[1]} differ: the features are of different images or orders")
    require(labels[0].shape == (len(old),), f"{paths[0]}: expected {len(old)} labels (one per feature row), got "
                                            f"shape {labels[0].shape}")
    return old, new, np.asarray(labels[0])


def fct_recipe(args):
    """The FCT recipe of the options: ``--published`` or the default one, with each option given over it."""
    recipe = dict(transforms.FCT_RECIPES["published" if args.published else "default"])
    given = {key: getattr(args, key) for key in recipe if getattr(args, key) is not None}
    if given.get("steps") is not None:
        recipe["epochs"] = None                    # --steps replaces the published epochs
    if given.get("epochs") is not None:
        recipe["steps"] = None
    recipe.update(given)
    return recipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="old-model features (N×d .npy)")
    parser.add_argument("--new", required=True, help="new-model features of the same images (N×d' .npy)")
    parser.add_argument("--kind", required=True, choices=transforms.KINDS)
    parser.add_argument("-o", "--output", required=True, help="transform file to write (.pt)")
    parser.add_argument("--heldout", type=float, default=transforms.HELDOUT,
                        help=f"share of the identities (of the rows without labels) kept out of fitting to measure "
                             f"it (default {transforms.HELDOUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of FCT's training")
    fct = parser.add_argument_group("fct (defaults: the default recipe, or with --published ml-fct's)")
    fct.add_argument("--published", action="store_true", help="ml-fct's released recipe: no skip path, mixer 2048, "
                     "batch 1024, 80 epochs, 5 warm-up epochs, BatchNorm frozen for the second half, no early stop")
    fct.add_argument("--steps", type=int, help=f"optimiser steps (default {transforms.FCT['steps']})")
    fct.add_argument("--epochs", type=int, help="passes over the training pairs instead of --steps (the schedule "
                                                "then moves per epoch, --warmup in epochs)")
    fct.add_argument("--warmup", type=int, help=f"linear warm-up steps (default {transforms.FCT['warmup']}; epochs with --epochs)")
    fct.add_argument("--inner_dim", type=int, help=f"width of the mixer (default {transforms.FCT['inner_dim']})")
    fct.add_argument("--batch_size", type=int, help=f"pairs per step (default {transforms.FCT['batch_size']})")
    fct.add_argument("--lr", type=float, help=f"Adam's learning rate (default {transforms.FCT['lr']})")
    fct.add_argument("--weight_decay", type=float, help=f"Adam's weight decay (default {transforms.FCT['weight_decay']})")
    fct.add_argument("--freeze_batchnorm", type=float, help=f"last share of the run with BatchNorm in eval mode "
                                                            f"(default {transforms.FCT['freeze_batchnorm']})")
    fct.add_argument("--skip", action=argparse.BooleanOptionalAction, default=None,
                     help="a skip path fixed at the least-squares map, the MLP learning the residual "
                          "(default: on; --published: off)")
    fct.add_argument("--eval_every", type=int, help="steps between held-out checks (default: one pass)")
    fct.add_argument("--patience", type=int, help=f"held-out checks without a lower loss before stopping; the best "
                                                  f"weights are kept (default {transforms.FCT['patience']}; 0: run the "
                                                  "whole budget, keep the last)")
    args = parser.parse_args(argv)
    require(0 < args.heldout < 1, f"--heldout must be a share between 0 and 1, got {args.heldout}")
    for name in ("steps", "epochs", "warmup", "inner_dim", "batch_size", "eval_every"):
        require(getattr(args, name) is None or getattr(args, name) >= 1, f"--{name} must be at least 1")
    require(args.steps is None or args.epochs is None, "give --steps or --epochs, not both")
    require(args.freeze_batchnorm is None or 0 <= args.freeze_batchnorm <= 1, "--freeze_batchnorm must be 0 to 1")
    require(args.patience is None or args.patience >= 0, "--patience must be 0 or more")
    old, new, labels = load_pairs(args.old, args.new)
    recipe = fct_recipe(args) if args.kind == "fct" else {}
    start = time.perf_counter()
    model, figures = transforms.fit_measured(args.kind, old, new, labels, args.heldout, args.seed, **recipe)
    seconds = time.perf_counter() - start
    transforms.save(model, args.output, figures, old=os.path.abspath(args.old), new=os.path.abspath(args.new),
                    seconds=f"{seconds:.1f}", **{f"fct_{key}": value for key, value in recipe.items()})
    print(transforms.figures_line(args.kind, figures))
    print(f"fitted {args.kind} transform {old.shape[1]}-d → {new.shape[1]}-d on {figures['pairs']} pairs in "
          f"{seconds:.1f} s → {args.output}")


if __name__ == "__main__":
    run_cli(main)
