"""``metrics.unique`` (one sort) next to ``np.unique`` at IJB-C size, and the ROC of float32-precision scores.

    python tools/benchmark/bench_unique.py [--values 15658489] [--distinct 400000] [--repeat 2] [--seed 0]

numpy ≥ 2.3 answers a plain ``np.unique`` of integers by hashing, several times slower than a sort
at millions of values; :func:`tools.ijbc_eval.metrics.unique` always sorts. Timed on random int64
values (``--values`` of ``--distinct`` distinct ones) for each output combination, results compared.
Then ``metrics.roc`` on ``--values`` scores rounded to float32 (ties, as saved float32 scores give),
with the module's ``unique`` and with ``np.unique`` put back in its place, the curves compared.
Best of ``--repeat`` runs; the last line is a JSON object of the figures.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from tools.ijbc_eval import metrics
from utils.errors import run_cli


def best(fn, repeat):
    """(fastest seconds of ``repeat`` calls, the last result)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def _numpy_unique(values, return_inverse=False, return_counts=False, presorted=False):
    return np.unique(values, return_inverse=return_inverse, return_counts=return_counts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--values", type=int, default=15_658_489)
    p.add_argument("--distinct", type=int, default=400_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    values = rng.integers(0, args.distinct, args.values)
    figures = {"numpy": np.__version__}
    for name, kw in (("plain", {}), ("counts", {"return_counts": True}), ("inverse", {"return_inverse": True})):
        t_np, want = best(lambda: np.unique(values, **kw), args.repeat)
        t_sort, got = best(lambda: metrics.unique(values, **kw), args.repeat)
        same = all(np.array_equal(a, b) for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (want, got))))
        print(f"unique {name}: np.unique {t_np:.2f} s, metrics.unique {t_sort:.2f} s, identical {same}")
        figures[f"unique_{name}"] = {"np_unique_s": round(t_np, 2), "sort_s": round(t_sort, 2), "identical": same}
    genuine = np.zeros(args.values, bool)
    genuine[rng.choice(args.values, max(2, args.values // 800), replace=False)] = True
    scores = (rng.normal(0, 0.1, args.values) + 0.5 * genuine).astype(np.float32).astype(np.float64)
    t_sort, (fpr, tpr) = best(lambda: metrics.roc(genuine, scores), args.repeat)
    kept, metrics.unique = metrics.unique, _numpy_unique
    try:
        t_np, (fpr_np, tpr_np) = best(lambda: metrics.roc(genuine, scores), args.repeat)
    finally:
        metrics.unique = kept
    same = np.array_equal(fpr, fpr_np) and np.array_equal(tpr, tpr_np)
    print(f"roc of {args.values:,} float32-precision scores: with np.unique {t_np:.2f} s, sort-based {t_sort:.2f} s, "
          f"identical {same}")
    figures["roc"] = {"np_unique_s": round(t_np, 2), "sort_s": round(t_sort, 2), "identical": bool(same)}
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
