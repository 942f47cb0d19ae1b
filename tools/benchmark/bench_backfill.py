"""Backfill curves at gallery scale: compat_eval's ``--backfill`` (every fraction, order and merge
from each score space computed once) next to the plain evaluation and the per-fraction evaluation.

    python tools/benchmark/bench_backfill.py [--images 50000] [--per_id 10] [--dim 128]
        [--impostors 1000000] [--spread 0.9 0.7] [--loop_points 2] [--seed 0]

Synthetic embeddings (no model): ``--images`` images of ``--images / --per_id`` identities, an old
and a new generation each made of identity centres plus noise of scale ``--spread`` (unit length). The protocol is
compat_eval's defaults (all genuine pairs, ``--impostors`` impostor pairs, one gallery image per
identity, 10 % of the identities held out as non-mated probes), ``--bootstrap 0``. Timed:

- **plain**: the 2-generation matrix (``protocol.compatibility``: 4 cells), what ``compat_eval
  --restore_embs … --bootstrap 0`` computes without ``--backfill``;
- **backfill**: what ``compat_eval --backfill`` adds: the three orders (random, norm, oracle; the
  oracle's order itself included) and ``backfill.backfill_curves`` with 2 merges × 11 fractions
  (66 points);
- **per-fraction loop**: the earlier implementation, a full evaluation of each point's mixed
  gallery (``protocol.outcomes``), timed on ``--loop_points`` points of each merge and
  extrapolated to 66 (it takes ~30 s a point at 50,000 images); the figures of those points are
  compared with the backfill's. ``--loop_points 0`` leaves it out (large sizes).

Prints each time (wall and CPU seconds: on a shared machine the CPU time is the steadier figure),
the ratios, the peak RSS and, last, a JSON object of the figures.
"""
import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from tools.compat_eval import backfill as bf
from tools.compat_eval import protocol as cp
from utils.errors import require, run_cli


def generation(rng, centres, labels, spread):
    """Unit-length image features: identity centre + Gaussian noise of scale ``spread``."""
    feats = centres[labels] + spread * rng.standard_normal((len(labels), centres.shape[1]), np.float32)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--per_id", type=int, default=10, help="images per identity")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--impostors", type=int, default=1_000_000)
    p.add_argument("--spread", type=float, nargs=2, default=(0.9, 0.7), metavar=("OLD", "NEW"),
                   help="noise scale of each generation around the identity centres (larger: harder)")
    p.add_argument("--loop_points", type=int, default=2,
                   help="points of the per-fraction loop timed per merge (0: not timed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    require(args.images >= 4 * args.per_id >= 8, "--images must hold at least 4 identities of 2+ images")
    require(0 <= args.loop_points <= len(bf.FRACTIONS), f"--loop_points must lie in 0..{len(bf.FRACTIONS)}")
    rng = np.random.default_rng(args.seed)
    labels = np.repeat(np.arange(args.images // args.per_id), args.per_id)
    centres = rng.standard_normal((labels[-1] + 1, args.dim), np.float32)
    old, new = generation(rng, centres, labels, args.spread[0]), generation(rng, centres, labels, args.spread[1])
    raw_old = old * rng.uniform(5, 30, (len(labels), 1)).astype(np.float32)
    protocol = cp.Protocol(labels, None, args.impostors, 1, 0.1, args.seed)
    print(f"protocol: {protocol.summary()}")

    start, cpu = time.perf_counter(), time.process_time()
    cp.compatibility([old, new], ["v1", "v2"], protocol, 0, args.seed, "TAR@FAR=1e-4")
    plain, plain_cpu = time.perf_counter() - start, time.process_time() - cpu

    far = 1e-4
    start, cpu = time.perf_counter(), time.process_time()
    orders = {"random": bf.random_order(labels[-1] + 1, args.seed),
              "norm": bf.norm_order(raw_old, labels, protocol.gallery_images),
              "oracle": bf.oracle_order(protocol, old, new, far, args.seed)}
    entries = bf.backfill_curves(protocol, old, new, orders, ["v1", "v2"], None, bf.MERGES, far, args.seed)
    curves, curves_cpu = time.perf_counter() - start, time.process_time() - cpu

    calibration = bf.Calibration(protocol, old, new, args.seed)
    fractions = bf.FRACTIONS[:args.loop_points]
    loop, differences = 0.0, []
    for e in entries[:len(bf.MERGES)] if fractions else ():   # the random order, both merges
        start = time.perf_counter()
        outcomes = [protocol.outcomes(new, bf.mixed_features(old, new, labels, state),
                                      None if e["merge"] == "plain" else calibration.at(state))
                    for state in (bf.refreshed_identities(orders["random"], protocol, f) for f in fractions)]
        loop += time.perf_counter() - start
        for k, (scores, found) in enumerate(outcomes):
            figures = protocol.figures(scores, found)[0]
            differences += [abs(figures[name] - e["metrics"][name][k]) for name in figures]
    points = len(entries) * len(bf.FRACTIONS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"plain evaluation (4 cells): {plain:.1f} s ({plain_cpu:.1f} CPU s)")
    print(f"backfill, {points} points (3 orders × 2 merges): {curves:.1f} s ({curves_cpu:.1f} CPU s): "
          f"{curves / plain:.2f}× the plain evaluation ({curves_cpu / plain_cpu:.2f}× in CPU time)")
    areas = {f"{e['order']}, {e['merge']}": [round(e["area"][name], 4) for name in ("TAR@FAR=1e-4", "top1")]
             for e in entries}
    print(f"areas under the TAR@FAR=1e-4 and top-1 curves: {areas}; old system {entries[0]['old_self']['top1']:.4f} "
          f"top-1, cross-test {entries[0]['metrics']['top1'][0]:.4f}, new self-test {entries[0]['metrics']['top1'][-1]:.4f}")
    figures = {"images": args.images, "identities": int(labels[-1] + 1), "dim": args.dim,
               "summary": protocol.summary(), "plain_seconds": round(plain, 2),
               "backfill_seconds": round(curves, 2), "ratio": round(curves / plain, 2),
               "plain_cpu_seconds": round(plain_cpu, 2), "backfill_cpu_seconds": round(curves_cpu, 2),
               "cpu_ratio": round(curves_cpu / plain_cpu, 2), "backfill_points": points,
               "areas": areas, "peak_rss_gb": round(peak, 2)}
    if fractions:
        per_point = loop / (len(fractions) * len(bf.MERGES))
        print(f"per-fraction loop: {per_point:.1f} s a point (timed on {len(fractions) * len(bf.MERGES)} points), "
              f"~{per_point * points:.0f} s for {points} points extrapolated ({per_point * points / plain:.0f}× plain)")
        print(f"largest figure difference between the two on the compared points: {max(differences):.1e}")
        figures.update(loop_seconds_per_point=round(per_point, 2), loop_seconds_extrapolated=round(per_point * points, 1),
                       max_figure_difference=max(differences))
    print(f"peak RSS {peak:.2f} GB")
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
