"""The paper's claims tested at demo scale: one study of demo runs per command (docs/claims.md).

    python tools/demo_study.py --study old_quality|denoise|scenarios [--seeds K] [--out DIR] [--data DIR]
                               [--quick] [--methods L2,BCT,…] [--bootstrap N] [--jobs 2]

``old_quality``: old models from weak to strong, every method at each level; ``denoise``: MixBCT's
denoising threshold and mix ratio; ``scenarios``: the four splits, every method. Each point is a demo
run under the demo's one training rule in ``<out>/points/<point>/`` (stages whose outputs exist are
skipped, so a rerun resumes; a finished ``tools/run_demo.py`` run copied to
``<out>/points/OPclass_old8x2/`` serves as the shipped point). Writes ``<out>/<study>/results.md``,
``results.json`` and ``results.png``. The studies and their outputs: ``tools/demo/study.py``.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.demo.settings import PROFILES
from tools.demo.stages import METHODS
from tools.demo.study import STUDIES, run_study
from utils.errors import run_cli


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, choices=STUDIES)
    parser.add_argument("--seeds", type=int, default=1, help="train every new model with K seeds (mean, paired intervals)")
    parser.add_argument("--profile", default="full", choices=PROFILES, help="the demo profile of every point")
    parser.add_argument("--quick", action="store_true", help="the same as --profile quick: a smoke run")
    parser.add_argument("--out", default=None, help="study folder (default: work_dirs/study, work_dirs/study_quick)")
    parser.add_argument("--data", default=None, help="synthetic data folder (default: dataset/synthetic, "
                                                     "dataset/synthetic_quick with --quick)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated BCT methods of old_quality and scenarios (default: all)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="N",
                        help="subject resamples of the 95 %% intervals (default: the demo's, 100; 20 with --quick)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="models trained at the same time")
    args = parser.parse_args()
    if args.quick:
        args.profile = "quick"
    quick = args.profile == "quick"
    args.methods = [m for m in args.methods.split(",") if m]
    if args.out is None:
        args.out = os.path.join(ROOT, "work_dirs", "study_quick" if quick else "study")
    if args.data is None:
        args.data = os.path.join(ROOT, "dataset", "synthetic_quick" if quick else "synthetic")
    run_cli(run_study, args)


if __name__ == "__main__":
    main()
