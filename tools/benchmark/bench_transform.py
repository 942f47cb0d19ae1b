"""Gallery transforms: the cost of mapping a stored gallery into a new model's space, and how well
each kind fits held-out identities on a problem a linear map solves.

    python tools/benchmark/bench_transform.py [--dim 512] [--pairs 20000] [--rows 65536] [--fct_steps 100]
    python tools/benchmark/bench_transform.py --linear_problem [--identities 1400] [--per_identity 8]
        [--dim 128] [--noise 0.22] [--offset 0] [--recipes default no_skip published]

Cost (the first form): random unit features stand in for the two models' (a transform's cost does
not depend on what the features mean); each kind (``fct`` with its default recipe) is fitted on
``--pairs`` pairs (FCT for ``--fct_steps`` steps), then ``apply_transform``'s streaming pass maps a
``--rows`` × d ``.npy`` file (memory-mapped, blocks of 65,536 rows, written atomically). Prints fit
and apply seconds and seconds per million features.

Held-out fit (``--linear_problem``): :func:`linear_problem` (``--identities`` × ``--per_identity``
old features, the new ones a random rotation of them plus noise and ``--offset``), each kind fitted by
``fit_transform``'s path (a fifth of the identities held out) and FCT with each of ``--recipes``
(``default``; ``no_skip``: the default budget without the skip path, run to its end; ``published``:
ml-fct's recipe, slow: 720 steps of 1,024 pairs through the 2,048-wide mixer). Prints
the held-out cosine and MSE of each next to the linear map's and the fit's seconds. The last line of
either form is a JSON object of the figures.
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

RECIPES = {"default": {}, "no_skip": {"skip": False, "patience": 0}, "published": transforms.FCT_RECIPES["published"]}


def linear_problem(identities=1400, per_identity=8, dim=128, noise=0.22, offset=0.0, spread=0.6, seed=0):
    """``(old, new, labels)``: float32 old features of ``identities`` × ``per_identity`` images (a random
    centre per identity plus ``spread`` of within-identity noise, unit rows) and new ones ``old R + o + ε``
    with ``R`` a random rotation, ``o`` a fixed random vector of norm ``offset`` and ``ε`` Gaussian of
    norm about ``noise``; the best map is linear."""
    from scipy.stats import ortho_group

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    old = rng.normal(size=(identities, dim))[labels] + spread * rng.normal(size=(len(labels), dim))
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    shift = rng.normal(size=dim)
    new = old @ ortho_group.rvs(dim, random_state=seed) + offset * shift / np.linalg.norm(shift)
    new += noise / np.sqrt(dim) * rng.normal(size=old.shape)
    return old.astype(np.float32), new.astype(np.float32), labels


def heldout_figures(args):
    """Held-out fit of every kind on :func:`linear_problem` (FCT once per recipe of ``args.recipes``)."""
    old, new, labels = linear_problem(args.identities, args.per_identity, args.dim, args.noise, args.offset,
                                      seed=args.seed)
    figures = {}
    runs = [(kind, kind, {}) for kind in transforms.KINDS if kind != "fct"]
    runs += [("fct", f"fct {name}", RECIPES[name]) for name in args.recipes]
    for kind, name, recipe in runs:
        start = time.perf_counter()
        _, fit = transforms.fit_measured(kind, old, new, labels, seed=args.seed, log=lambda _: None, **recipe)
        figures[name] = dict(fit, fit_seconds=round(time.perf_counter() - start, 1))
        print(f"{name:18s} {transforms.figures_line(kind, fit)} in {figures[name]['fit_seconds']:.1f} s", flush=True)
    return figures


def cost_figures(args):
    """Fit and apply seconds of every kind on random features."""
    rng = np.random.default_rng(args.seed)
    old = rng.standard_normal((args.pairs, args.dim), dtype=np.float32)
    new = rng.standard_normal((args.pairs, args.dim), dtype=np.float32)
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        gallery = os.path.join(folder, "gallery.npy")
        np.save(gallery, rng.standard_normal((args.rows, args.dim), dtype=np.float32))
        for kind in transforms.KINDS:
            start = time.perf_counter()
            model = transforms.fit(kind, old, new, seed=args.seed, log=lambda _: None, steps=args.fct_steps)
            fit_seconds = time.perf_counter() - start
            seconds = transforms.apply_file(model, gallery, os.path.join(folder, f"{kind}.npy"))
            figures[kind] = dict(fit_seconds=round(fit_seconds, 2), apply_seconds=round(seconds, 3),
                                 seconds_per_million=round(seconds / args.rows * 1e6, 2))
            print(f"{kind:18s} fit {fit_seconds:7.2f} s ({args.pairs} pairs"
                  + (f", {args.fct_steps} steps" if kind == "fct" else "") + f"), apply {seconds:7.3f} s for "
                  f"{args.rows} × {args.dim} → {figures[kind]['seconds_per_million']:.2f} s per million features")
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--linear_problem", action="store_true", help="measure the held-out fit instead of the cost")
    parser.add_argument("--dim", type=int, help="old and new embedding size (default 512; 128 with --linear_problem)")
    parser.add_argument("--pairs", type=int, default=20000, help="feature pairs to fit on (cost)")
    parser.add_argument("--rows", type=int, default=65536, help="gallery features to transform (cost)")
    parser.add_argument("--fct_steps", type=int, default=100, help="FCT steps (cost; the time per step scales)")
    parser.add_argument("--identities", type=int, default=1400, help="identities of the linear problem")
    parser.add_argument("--per_identity", type=int, default=8, help="images per identity of the linear problem")
    parser.add_argument("--noise", type=float, default=0.22, help="noise of the linear problem's new features")
    parser.add_argument("--offset", type=float, default=0.0, help="norm of the linear problem's offset")
    parser.add_argument("--recipes", nargs="*", default=["default", "no_skip"], choices=list(RECIPES),
                        help="FCT recipes of the linear problem")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.dim = args.dim or (128 if args.linear_problem else 512)
    require(min(args.dim, args.pairs, args.rows, args.fct_steps, args.identities, args.per_identity) >= 1,
            "all sizes must be at least 1")
    require(min(args.noise, args.offset) >= 0, "--noise and --offset must be 0 or more")
    figures = heldout_figures(args) if args.linear_problem else cost_figures(args)
    print(json.dumps(dict(vars(args), kinds=figures)))


if __name__ == "__main__":
    run_cli(main)
