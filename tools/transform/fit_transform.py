"""Fit a gallery transform h: old-model space → new-model space from the two models' features of one set.

    python tools/transform/fit_transform.py --old OLD_feature.npy --new NEW_feature.npy --kind fct -o h.pt
        [--epochs 80] [--inner_dim 2048] [--batch_size 1024] [--seed 0]

``--old``/``--new``: N×d feature files of the same images in the same order (``get_feature.py`` run
with the old and with the new model on the new training set). When both have a ``<SD>_label.npy``
beside them, the labels must agree. Kinds: ``linear`` (least squares), ``procrustes`` (orthogonal),
``fct`` (the FCT MLP, trained); see docs/transform.md.
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
    """The memory-mapped old and new feature arrays, checked to describe the same images."""
    old, new = safe_np_load(old_path, mmap_mode="r"), safe_np_load(new_path, mmap_mode="r")
    for path, rows in ((old_path, old), (new_path, new)):
        require(rows.ndim == 2 and rows.dtype.kind == "f", f"{path}: expected an N×d float feature array, "
                                                           f"got {rows.dtype} {rows.shape}")
    require(len(old) == len(new), f"{old_path} has {len(old)} rows but {new_path} has {len(new)}: the two "
                                  "models' features of the same images are needed, in the same order")
    labels = [_labels_of(p) for p in (old_path, new_path)]
    if all(labels):
        require(np.array_equal(safe_np_load(labels[0], mmap_mode="r"), safe_np_load(labels[1], mmap_mode="r")),
                f"{labels[0]} and {labels[1]} differ: the features are of different images or orders")
    return old, new


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", required=True, help="old-model features (N×d .npy)")
    parser.add_argument("--new", required=True, help="new-model features of the same images (N×d' .npy)")
    parser.add_argument("--kind", required=True, choices=transforms.KINDS)
    parser.add_argument("-o", "--output", required=True, help="transform file to write (.pt)")
    parser.add_argument("--epochs", type=int, default=transforms.FCT["epochs"],
                        help=f"fct: training epochs (default {transforms.FCT['epochs']}, as published)")
    parser.add_argument("--inner_dim", type=int, default=transforms.FCT["inner_dim"],
                        help=f"fct: width of the mixer (default {transforms.FCT['inner_dim']}, as published)")
    parser.add_argument("--batch_size", type=int, default=transforms.FCT["batch_size"],
                        help=f"fct: pairs per step (default {transforms.FCT['batch_size']}, as published)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require(min(args.epochs, args.inner_dim, args.batch_size) >= 1,
            "--epochs, --inner_dim and --batch_size must be at least 1")
    old, new = load_pairs(args.old, args.new)
    start = time.perf_counter()
    model = transforms.fit(args.kind, old, new, args.epochs, args.inner_dim, args.seed, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    transforms.save(model, args.output, old=os.path.abspath(args.old), new=os.path.abspath(args.new),
                    epochs=args.epochs if args.kind == "fct" else 0, seconds=f"{seconds:.1f}")
    print(f"fitted {args.kind} transform {old.shape[1]}-d → {new.shape[1]}-d on {len(old)} pairs in {seconds:.1f} s "
          f"→ {args.output}")


if __name__ == "__main__":
    run_cli(main)
