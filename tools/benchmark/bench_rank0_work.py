"""Duration of the work rank 0 does alone while the other ranks wait, at full MS1MV3 scale, on one thread.

    python tools/benchmark/bench_rank0_work.py [--images 3598269] [--classes 65402 93431] [--dim 512]

In a multi-process run two pieces of work run on rank 0 only, inside ``compute_on_main``, while
the other ranks wait in a broadcast bounded by the process-group timeout (30 minutes):
AdvBCT's class statistics over the memory-mapped old features (``advbct_class_stats``, once at
set-up) and UniBCT's prototype refinement (``refine_prototypes``, at each refine epoch, after the
sharded re-embedding). torchrun sets ``OMP_NUM_THREADS=1``, so this script times both with one
thread (``torch.set_num_threads(1)``, the variable set before numpy loads) on generated
class-structured float32 features of ``--images`` × ``--dim`` (memory-mapped, as in training), once
per class count. The refinement's new features are the same file (its cost does not depend on the
values). The generated file is deleted at the end. The last output line is a JSON object.
"""
import os

os.environ["OMP_NUM_THREADS"] = "1"   # as torchrun sets it; before numpy and torch start their pools

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from BCT_methods.UniBCT.losses import refine_prototypes  # noqa: E402
from tools.benchmark.bench_features import generate  # noqa: E402
from utils.errors import require, run_cli  # noqa: E402
from utils.feature_stats import advbct_class_stats  # noqa: E402

PROCESS_GROUP_TIMEOUT_S = 30 * 60


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(workdir, classes):
    """Seconds of ``advbct_class_stats`` and ``refine_prototypes`` on the generated files."""
    features = np.load(os.path.join(workdir, "feat.npy"), mmap_mode="r", allow_pickle=False)
    labels = np.load(os.path.join(workdir, "label.npy"), allow_pickle=False)
    advbct = timed(lambda: advbct_class_stats(features, labels, classes))
    refine = timed(lambda: refine_prototypes(features, features, labels, classes, softmax="row"))
    return advbct, refine


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3_598_269)
    parser.add_argument("--classes", type=int, nargs="+", default=[65_402, 93_431])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="where to generate the features (default: a temp folder)")
    args = parser.parse_args(argv)
    require(args.images > 0 and args.dim > 0 and all(c > 0 for c in args.classes),
            "--images, --dim and --classes must be positive")
    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="bench_rank0_", dir=args.workdir)
    figures = {"images": args.images, "dim": args.dim, "threads": torch.get_num_threads(),
               "process_group_timeout_s": PROCESS_GROUP_TIMEOUT_S, "load_average_at_start": os.getloadavg()[0]}
    try:
        for classes in args.classes:
            generate(workdir, args.images, classes, args.dim)
            advbct, refine = measure(workdir, classes)
            figures[f"classes_{classes}"] = {"advbct_class_stats_s": round(advbct, 1),
                                             "unibct_refine_prototypes_s": round(refine, 1)}
            print(f"{args.images} x {args.dim}, {classes} classes, 1 thread: AdvBCT class statistics {advbct:.1f} s, "
                  f"UniBCT refinement {refine:.1f} s (process-group timeout {PROCESS_GROUP_TIMEOUT_S} s)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
