"""Map a stored old-model gallery into the new model's space with a fitted transform.

    python tools/transform/apply_transform.py h.pt GALLERY_feature.npy OUT.npy [--block 65536]

Reads the N×d feature file through a memory map in blocks of ``--block`` rows and writes the
N×d' float32 result atomically (nothing is left behind when it fails). See docs/transform.md.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from tools.transform import transforms
from utils.errors import require, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("transform", help="transform file written by fit_transform.py")
    parser.add_argument("source", help="old-model features (N×d .npy)")
    parser.add_argument("target", help="where to write the transformed features (.npy)")
    parser.add_argument("--block", type=int, default=transforms.BLOCK_ROWS, help="rows per block")
    args = parser.parse_args(argv)
    require(args.block >= 1, f"--block must be at least 1, got {args.block}")
    require(args.target.endswith(".npy"), f"target must end in .npy, got {args.target}")
    model, saved = transforms.load(args.transform)
    seconds = transforms.apply_file(model, args.source, args.target, args.block)
    rows = len(np.load(args.target, mmap_mode="r", allow_pickle=False))
    print(f"{saved['kind']} transform of {rows} features in {seconds:.2f} s "
          f"({seconds / max(rows, 1) * 1e6:.1f} s per million) → {os.path.abspath(args.target)}")


if __name__ == "__main__":
    run_cli(main)
