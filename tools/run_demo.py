"""The whole pipeline on synthetic data, on a CPU, ending with the comparison table.

    python tools/run_demo.py [--quick] [--methods L2,BCT,…] [--scenario OPclass] [--out DIR] [--reuse]
                             [--seeds K] [--bootstrap N] [--generations 3 [--generation_method L2]]
                             [--identities N] [--images_per_identity N] [--ijb_subjects N]
                             [--old_epochs N] [--new_epochs N]

Stages (each the real stage script, run as a subprocess with its own log under ``<out>/logs/``):
synthetic data → split → old model (softmax) → old features → prototypes → denoising →
independent new model and each BCT method (K seeds each with ``--seeds K``) → IJB-C-style 1:1 and
1:N, self-test and cross-test, with 95 % subject-bootstrap intervals. Writes ``<out>/results.md``,
``<out>/results.json`` and ``<out>/results.png``. Sizes and the tuning rule: configs/demo/settings.py.
``--generations 3`` then trains a third generation with ``--generation_method`` against the second
generation's features (the model that method trained) and ends with the compatibility matrix of the
three generations on held-out synthetic identities (``tools/compat_eval``): ``<out>/compat.md``.
This is the command line of the demo package ``tools/demo/`` (the stage runner, the stages, the report).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.demo.settings import PROFILES
from tools.demo.stages import BOOTSTRAP, METHODS, SIZE_OPTIONS, run_pipeline
from utils.errors import run_cli
from utils.scenarios import SCENARIOS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="full", choices=PROFILES,
                        help="sizes and training rule (configs/demo/settings.py): full (default) or quick")
    parser.add_argument("--quick", action="store_true",
                        help="the same as --profile quick: a smoke run (about 45 s on 2 idle cores, minutes "
                             "on a loaded machine)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated BCT methods to train")
    parser.add_argument("--scenario", default="OPclass", choices=SCENARIOS)
    parser.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "demo"))
    parser.add_argument("--data", default=None, help="synthetic data folder (default: dataset/synthetic, "
                                                     "dataset/synthetic_quick with --quick)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip stages whose outputs exist (a model's evaluation too, when its result files are "
                             "newer than the model and hold the same resamples)")
    parser.add_argument("--seeds", type=int, default=1, help="train every new model with K seeds (mean ± sd)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help=f"subject resamples of the 95 %% intervals (default {BOOTSTRAP['full']}, "
                             f"{BOOTSTRAP['quick']} with --quick; 0: none)")
    parser.add_argument("--generations", type=int, default=2, choices=(2, 3),
                        help="3: also train a third generation against the second and end with the "
                             "compatibility matrix of the three (off by default; time: docs/compat.md)")
    parser.add_argument("--generation_method", default="L2",
                        help="method of generations 2 and 3 for --generations 3 (one of --methods; default L2)")
    for option, text in SIZE_OPTIONS.items():
        parser.add_argument(f"--{option}", type=float if option == "lr" else int, default=None, metavar="N",
                            help=f"{text} (default: configs/demo/settings.py's profile)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="new models trained at the same time (default: 2, each with half the CPU threads)")
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        args.profile = "quick"
    args.quick = args.profile == "quick"
    if args.data is None:
        args.data = os.path.join(ROOT, "dataset", "synthetic_quick" if args.quick else "synthetic")
    run_cli(run_pipeline, args)


if __name__ == "__main__":
    main()
