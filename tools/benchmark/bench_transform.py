"""Gallery transforms: the cost of mapping a stored gallery into a new model's space, per million features.

    python tools/benchmark/bench_transform.py [--dim 512] [--pairs 20000] [--rows 65536] [--fct_epochs 1]

Random unit features stand in for the two models' (a transform's cost does not depend on what the
features mean): each kind (``linear``, ``procrustes``, ``fct`` with the published 2,048-wide
mixer) is fitted on ``--pairs`` pairs (FCT for ``--fct_epochs`` epochs), then
``apply_transform``'s streaming pass maps a ``--rows`` × d ``.npy`` file (memory-mapped, blocks of
65,536 rows, written atomically). Prints fit and apply seconds and seconds per million features;
the last line is a JSON object of the figures.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from tools.transform import transforms
from utils.errors import require, run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512, help="old and new embedding size (default 512)")
    parser.add_argument("--pairs", type=int, default=20000, help="feature pairs to fit on")
    parser.add_argument("--rows", type=int, default=65536, help="gallery features to transform")
    parser.add_argument("--fct_epochs", type=int, default=1, help="FCT epochs (published: 80; cost per epoch scales)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require(min(args.dim, args.pairs, args.rows, args.fct_epochs) >= 1, "all sizes must be at least 1")
    rng = np.random.default_rng(args.seed)
    old = rng.standard_normal((args.pairs, args.dim), dtype=np.float32)
    new = rng.standard_normal((args.pairs, args.dim), dtype=np.float32)
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        gallery = os.path.join(folder, "gallery.npy")
        np.save(gallery, rng.standard_normal((args.rows, args.dim), dtype=np.float32))
        for kind in transforms.KINDS:
            start = time.perf_counter()
            model = transforms.fit(kind, old, new, epochs=args.fct_epochs, seed=args.seed, log=lambda _: None)
            fit_seconds = time.perf_counter() - start
            seconds = transforms.apply_file(model, gallery, os.path.join(folder, f"{kind}.npy"))
            figures[kind] = dict(fit_seconds=round(fit_seconds, 2), apply_seconds=round(seconds, 3),
                                 seconds_per_million=round(seconds / args.rows * 1e6, 2))
            print(f"{kind:10s} fit {fit_seconds:7.2f} s ({args.pairs} pairs"
                  + (f", {args.fct_epochs} epoch(s)" if kind == "fct" else "") + f"), apply {seconds:7.3f} s for "
                  f"{args.rows} × {args.dim} → {figures[kind]['seconds_per_million']:.2f} s per million features")
    print(json.dumps(dict(vars(args), kinds=figures)))


if __name__ == "__main__":
    run_cli(main)
