"""compat_eval's exact 1:N search at deployment scale: a 1 M × 512 gallery searched by 10 k probes,
side by side with faiss ``IndexFlatIP`` (exact inner-product search) on the same embeddings.

    python tools/benchmark/bench_compat.py [--gallery 1000000] [--probes 10000] [--dim 512]
        [--nonmated_share 0.1] [--bootstrap 200] [--block 33554432] [--seed 0] [--no_faiss]

Random embeddings stand in for a model's (as when compat_eval evaluates saved embeddings with
``--restore_embs``): one unit-length gallery template per identity, probes of gallery identities
made from their template plus noise (cosine 0.1–0.4 with it; the best of
1 M random gallery templates scores about 0.23), and non-mated probes of identities outside
the gallery. The search is compat_eval's: exact, in blocks of probes holding ``--block``
similarities at most, reduced to each probe's exact top 8 (``tools.compat_eval.protocol.top_k``); then
top-1/top-5 and TPIR@FPIR (``metrics.search_summary``) and the bootstrap over probe identities.
The exact top-8 lists alone are timed again (``top_k``) next to faiss ``IndexFlatIP.search`` with
k = 8 (skipped when faiss is not installed, or with ``--no_faiss``), and the two lists compared.
Prints the time of each part and the peak RSS next to the size of the gallery; the last line is a
JSON object of the figures.
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

from tools.compat_eval.protocol import SEARCH_BLOCK, SEARCH_DEPTH, TOPK, search, top_k
from tools.ijbc_eval import bootstrap, metrics
from utils.errors import require, run_cli

BUILD_ROWS = 1 << 16


def unit_rows(rng, count, dim):
    """``count`` random unit vectors (float32), made in slices so no float64 copy of the whole matrix exists."""
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, BUILD_ROWS):
        part = rng.standard_normal((min(BUILD_ROWS, count - start), dim), dtype=np.float32)
        out[start:start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def build(num_gallery, num_probes, dim, nonmated_share, seed):
    """``(gallery, gallery subjects, probes, probe subjects)``; non-mated probes have subjects ≥ num_gallery."""
    rng = np.random.default_rng(seed)
    gallery = unit_rows(rng, num_gallery, dim)
    num_nonmated = int(round(nonmated_share * num_probes))
    subjects = np.r_[rng.integers(0, num_gallery, num_probes - num_nonmated),
                     num_gallery + rng.permutation(num_nonmated)]
    probes = unit_rows(rng, num_probes, dim)
    mated = subjects < num_gallery
    signal = rng.uniform(0.1, 0.4, (int(mated.sum()), 1)).astype(np.float32)
    probes[mated] = signal * gallery[subjects[mated]] + np.sqrt(1 - signal ** 2) * probes[mated]
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    return gallery, np.arange(num_gallery), probes, subjects


def compare_faiss(probes, gallery, block, use_faiss=True):
    """Wall and CPU seconds (all threads) of :func:`top_k` alone and, when faiss is importable, of
    ``IndexFlatIP.search`` (k equal), with the share of identical list entries and the largest value difference."""
    start, cpu = time.perf_counter(), time.process_time()
    values, columns = top_k(probes, gallery, SEARCH_DEPTH, block)
    figures = dict(top_k_s=round(time.perf_counter() - start, 1), top_k_cpu_s=round(time.process_time() - cpu, 1))
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is None or not use_faiss:
        return dict(figures, faiss="not installed" if faiss is None else "skipped")
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    start, cpu = time.perf_counter(), time.process_time()
    faiss_values, faiss_columns = index.search(probes, SEARCH_DEPTH)
    figures.update(faiss_s=round(time.perf_counter() - start, 1), faiss_cpu_s=round(time.process_time() - cpu, 1),
                   faiss_threads=faiss.omp_get_max_threads(),
                   same_columns=float((faiss_columns == columns).mean()),
                   max_value_diff=float(np.abs(faiss_values - values).max()))
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--probes", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--nonmated_share", type=float, default=0.1)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--block", type=int, default=SEARCH_BLOCK, help="similarities per block of probes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_faiss", action="store_true", help="do not time faiss IndexFlatIP")
    args = p.parse_args(argv)
    require(args.gallery >= 1 and args.probes >= 1 and args.dim >= 1, "--gallery, --probes and --dim must be >= 1")

    start = time.perf_counter()
    gallery, gallery_subjects, probes, probe_subjects = build(args.gallery, args.probes, args.dim,
                                                              args.nonmated_share, args.seed)
    built = time.perf_counter()
    found = search(probes, gallery, gallery_subjects, probe_subjects, args.block)
    searched = time.perf_counter()
    summary = metrics.search_summary(found, TOPK)[0]
    counted = time.perf_counter()
    intervals = None
    if args.bootstrap:
        num_subjects, (index,) = bootstrap.subject_index(probe_subjects)
        counts = bootstrap.subject_counts(num_subjects, args.bootstrap, args.seed)
        intervals = bootstrap.percentile_intervals(bootstrap.identification_replicates(found, index, counts, TOPK))
    finished = time.perf_counter()
    lists = compare_faiss(probes, gallery, args.block, not args.no_faiss)

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
    gallery_gb = gallery.nbytes / 2 ** 30
    figures = dict(gallery=args.gallery, probes=args.probes, dim=args.dim, block=args.block,
                   threads=os.environ.get("OMP_NUM_THREADS"), cpus=os.cpu_count(),
                   build_s=round(built - start, 1), search_s=round(searched - built, 1),
                   summary_s=round(counted - searched, 2), bootstrap_s=round(finished - counted, 2),
                   bootstrap=args.bootstrap, peak_rss_gb=round(peak_gb, 2), gallery_gb=round(gallery_gb, 2),
                   top1=summary["top1"], top5=summary["top5"], tpir=summary["TPIR@FPIR"], intervals=intervals,
                   **lists)
    print(f"gallery {args.gallery:,} × {args.dim} ({gallery_gb:.2f} GB float32), {args.probes:,} probes "
          f"({summary['num_mated']:,} mated), blocks of {args.block:,} similarities")
    print(f"exact search {figures['search_s']:.1f} s, counting {figures['summary_s']:.2f} s, "
          f"bootstrap ({args.bootstrap} resamples) {figures['bootstrap_s']:.2f} s; "
          f"peak RSS {peak_gb:.2f} GB (gallery {gallery_gb:.2f} GB); building the data {figures['build_s']:.1f} s")
    print(f"exact top-{SEARCH_DEPTH} lists alone: protocol.top_k {lists['top_k_s']:.1f} s (CPU {lists['top_k_cpu_s']:.1f} s)"
          + (f", faiss IndexFlatIP {lists['faiss_s']:.1f} s (CPU {lists['faiss_cpu_s']:.1f} s, "
             f"{lists['faiss_threads']} threads), same columns in "
             f"{lists['same_columns']:.4%} of the list entries, largest value difference {lists['max_value_diff']:.1e}"
             if "faiss_s" in lists else f" (faiss: {lists['faiss']})"))
    print(f"top1 {summary['top1']:.4f}  top5 {summary['top5']:.4f}  TPIR@FPIR=1e-2 {summary['TPIR@FPIR']['1e-2']:.4f}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    run_cli(main)
