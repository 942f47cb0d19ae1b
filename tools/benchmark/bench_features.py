"""Speed and memory of the old-feature statistics (steps 3–4, NCCL/AdvBCT), against a per-class loop.

    python tools/benchmark/bench_features.py [--setting class70|shuffled] [--scale 1.0] [--dims 128 512]
        [--nccl_scale 0.03] [--ops avg denoise nccl advbct]

Generates random class-structured features under ``--workdir``: ``class70`` is MS1MV3 class70
(3,598,269 × d float32 at scale 1, 65,402 classes with lognormal sizes around 55, min 1, labels
sorted as in a class split); ``shuffled`` is 1,354,539 × d with 30,000 classes of 1–90 images
(uniform) in shuffled order. Every operation then runs as its own process (interpreter start and
file loading included) and reports wall time and peak RSS (``ru_maxrss`` of that process,
mmapped pages included), once with ``utils.feature_stats`` and once with a loop written the way
the published scripts are (sort the labels, walk the samples in a Python loop to find each class,
numpy per class; the denoiser L2-normalises rows, then columns over the dataset, as published),
on the same files. Results are compared (averages and radii: max abs difference; masks: fraction
of differing rows). The shipped commands (``get_avg_feature.py``, ``denoise_credible.py`` with
column normalisation) are timed on the same files too, and their total is set against the loop's
("before": the published-style loop, "after": the toolkit's commands, start-up included).

NCCL credibility costs N×C×d, so it runs on a smaller problem (``--nccl_scale``) and the full-scale
time is extrapolated by (1/s)². The page cache is warmed before each run. The published-style
loop is given an address-space limit of 85 % of the available memory so that, where it cannot fit,
it fails with MemoryError instead of waking the OOM killer. Generated files are deleted at the end
(``--keep`` keeps them). The last output line is a JSON object of the figures.
"""
import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from utils.errors import UserError, require, run_cli

SETTINGS = {"class70": dict(images=3_598_269, classes=65_402, sizes="lognormal", shuffle=False),
            "shuffled": dict(images=1_354_539, classes=30_000, sizes="uniform", shuffle=True)}
T = 0.9
OPS = ("avg", "denoise", "nccl", "advbct")


# ----------------------------------------------------------------------------- data


def class_sizes(num_images, num_classes, rng, kind="lognormal"):
    """Class sizes summing exactly to ``num_images``: lognormal (mean N/C, min 1) or uniform in 1..2N/C."""
    if kind == "uniform":
        top = max(1, round(2 * num_images / num_classes) - 1)
        sizes = rng.integers(1, top + 1, size=num_classes)
        while sizes.sum() != num_images:       # move single images until the total is exact
            short = num_images - int(sizes.sum())
            room = np.flatnonzero(sizes < top) if short > 0 else np.flatnonzero(sizes > 1)
            require(len(room) > 0, "cannot balance the class sizes")
            sizes[rng.choice(room, min(abs(short), len(room)), replace=False)] += np.sign(short)
        return sizes
    raw = rng.lognormal(0.0, 0.7, size=num_classes)
    sizes = np.maximum(1, np.floor(raw * num_images / raw.sum())).astype(np.int64)
    short = num_images - int(sizes.sum())
    if short > 0:
        sizes[np.argsort(-raw)[:short]] += 1
    else:
        sizes[np.argmax(sizes)] += short
    require(sizes.min() >= 1 and sizes.sum() == num_images, "cannot balance the class sizes")
    return sizes


def generate(folder, num_images, num_classes, dim, sizes="lognormal", shuffle=False, seed=0):
    """Write ``feat.npy`` (N×d float32: class centre + noise, chunk by chunk) and ``label.npy``."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), class_sizes(num_images, num_classes, rng, sizes))
    if shuffle:
        labels = rng.permutation(labels)
    np.save(os.path.join(folder, "label.npy"), labels)
    centres = rng.standard_normal((num_classes, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(os.path.join(folder, "feat.npy"), "w+", np.float32, (num_images, dim))
    step = 1 << 18
    for start in range(0, num_images, step):
        lab = labels[start:start + step]
        noise = rng.standard_normal((len(lab), dim), dtype=np.float32)
        noise *= rng.uniform(0.3, 1.5, size=(len(lab), 1)).astype(np.float32)
        out[start:start + len(lab)] = centres[lab] + noise
    out.flush()
    del out


# ----------------------------------------------------------------------------- published-style loops


def _class_runs(labels):
    """Walk the sorted labels in a Python loop; yield ``(class, start, stop)`` of each run."""
    start, current = 0, labels[0]
    for i, label in enumerate(labels):
        if label != current:
            yield current, start, i
            start, current = i, label
    yield current, start, len(labels)


def _load_sorted(feat_path, label_path, normalize):
    data = np.load(feat_path, allow_pickle=False)
    labels = np.load(label_path, allow_pickle=False)
    order = np.argsort(labels, kind="stable")
    data = data[order]
    if normalize:
        data = data / np.linalg.norm(data, axis=1, keepdims=True)
    return data, labels[order], order


def loop_avg(feat_path, label_path):
    data, labels, _ = _load_sorted(feat_path, label_path, normalize=False)
    rows = [np.sum(data[a:b], axis=0) / (b - a) for _, a, b in _class_runs(labels)]
    avg = np.stack(rows)
    return avg / np.linalg.norm(avg, axis=1, keepdims=True)


def loop_denoise(feat_path, label_path):
    from scipy.spatial.distance import cdist
    data, labels, order = _load_sorted(feat_path, label_path, normalize=True)
    data = data / np.linalg.norm(data, axis=0, keepdims=True)     # columns to unit norm, as published
    mask = np.zeros(len(labels), dtype=np.uint8)
    for _, a, b in _class_runs(labels):
        chunk = data[a:b]
        dist = cdist(chunk, chunk.mean(axis=0, keepdims=True)).ravel()
        keep = math.ceil(T * (b - a))
        mask[order[a + np.argsort(dist, kind="stable")[:keep]]] = 1
    return mask


def loop_advbct(feat_path, label_path):
    data, labels, _ = _load_sorted(feat_path, label_path, normalize=True)
    radii = []
    for _, a, b in _class_runs(labels):
        chunk = data[a:b]
        dist = np.sort(np.linalg.norm(chunk - chunk.mean(axis=0), axis=1))
        if len(dist) >= 4:
            q1, q3 = dist[len(dist) // 4], dist[3 * len(dist) // 4]
            iqr = q3 - q1
            dist = dist[(dist >= q1 - 1.5 * iqr) & (dist <= q3 + 1.5 * iqr)]
        radii.append(dist.max())
    return np.array(radii, dtype=np.float32)


def loop_nccl(feat_path, label_path):
    from scipy.spatial.distance import cdist
    data, labels, order = _load_sorted(feat_path, label_path, normalize=True)
    runs = list(_class_runs(labels))
    centres = np.stack([data[a:b].mean(axis=0) for _, a, b in runs])
    threshold = np.log(len(runs)) / 2
    mask = np.zeros(len(labels), dtype=np.uint8)
    for c, a, b in runs:
        dist = cdist(data[a:b], centres)
        logits = -dist / (np.var(dist[:, c]) + 1e-10)
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        entropy = -np.sum(p * np.log(np.where(p > 0, p, 1)), axis=1)
        mask[order[a:b]] = entropy <= threshold
    return mask


# ----------------------------------------------------------------------------- ours


def ours(op, feat_path, label_path):
    from utils import feature_stats as fs
    features = np.load(feat_path, mmap_mode="r", allow_pickle=False)
    labels = np.load(label_path, allow_pickle=False)
    if op == "avg":
        return fs.class_prototypes(features, labels)
    if op == "denoise":
        return fs.credible_mask(features, labels, T, column_norm=True)
    if op == "nccl":
        return fs.nccl_feature_credible_mask(features, labels)
    return fs.advbct_class_stats(features, labels).radii


LOOPS = {"avg": loop_avg, "denoise": loop_denoise, "nccl": loop_nccl, "advbct": loop_advbct}


def child(args):
    """One measured run: compute ``args.op`` with ``args.impl`` and save the result."""
    if args.impl == "loop":
        result = LOOPS[args.op](args.features, args.labels)
    else:
        result = ours(args.op, args.features, args.labels)
    np.save(args.result, result)


# ----------------------------------------------------------------------------- driver


def warm(path):
    with open(path, "rb") as handle:
        while handle.read(64 << 20):
            pass


def run_measured(command, limit_bytes=None):
    """Run ``command``; return (wall seconds, CPU seconds, peak RSS bytes, error line or None)."""
    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(command, preexec_fn=limit, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        lines = errors.read().decode(errors="replace").strip().splitlines()
    error = None if proc.returncode == 0 else (lines[-1] if lines else f"exit {proc.returncode}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, error


def measure(op, impl, folder, limit_bytes):
    """One child process computing ``op`` with ``impl`` (the loop under an address-space limit)."""
    feat, label = os.path.join(folder, "feat.npy"), os.path.join(folder, "label.npy")
    warm(feat)
    result = os.path.join(folder, f"{op}_{impl}.npy")
    command = [sys.executable, os.path.abspath(__file__), "--child", op, impl, feat, label, result]
    return run_measured(command, limit_bytes if impl == "loop" else None)


def column_norm_args(script):
    """``denoise_credible.py``'s option for the published column normalisation ([] when it is the default)."""
    text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True).stdout
    return ["--column_norm"] if "--column_norm" in text and "--no_column_norm" not in text else []


def measure_tools(folder, dim):
    """The shipped commands (start-up, validation, atomic writes included) on the same files."""
    sd = f"f{dim}_r18_softmax_class70"
    for kind, name in (("feature", "feat.npy"), ("label", "label.npy")):
        link = os.path.join(folder, f"{sd}_{kind}.npy")
        if not os.path.islink(link):
            os.symlink(name, link)
    denoise = os.path.join(ROOT, "tools", "get_feature", "denoise_credible.py")
    figures = {}
    for tool, extra in (("get_avg_feature.py", []), ("denoise_credible.py", ["--T", str(T), *column_norm_args(denoise)])):
        warm(os.path.join(folder, "feat.npy"))
        command = [sys.executable, os.path.join(ROOT, "tools", "get_feature", tool), "--SD", sd,
                   "--output", folder, *extra]
        figures[tool] = run_measured(command)
    return figures


def _figures(seconds, cpu, rss, error, file_bytes):
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_gb": round(rss / 1e9, 3),
            "rss_over_file": round(rss / file_bytes, 2), "error": error}


def _best(runs):
    """The fastest of repeated runs (wall time), with every run's wall time."""
    best = min(runs, key=lambda r: r[0] if r[3] is None else float("inf"))
    return best, [round(r[0], 2) for r in runs]


def _show(name, row):
    print(f"{name:32s} {row['seconds']:8.2f} s wall {row['cpu_seconds']:8.2f} s CPU  peak RSS "
          f"{row['peak_rss_gb']:6.2f} GB ({row['rss_over_file']:.2f}× file)"
          f"{'  FAILED: ' + row['error'] if row['error'] else ''}", flush=True)


def compare(op, folder):
    a = np.load(os.path.join(folder, f"{op}_ours.npy"), allow_pickle=False)
    b = np.load(os.path.join(folder, f"{op}_loop.npy"), allow_pickle=False)
    if op in ("avg", "advbct"):
        return {"max_abs_diff": float(np.abs(a.astype(np.float64) - b).max())}
    return {"mask_diff_fraction": float(np.mean(a != b)), "kept_fraction": float(a.mean())}


def available_bytes():
    with open("/proc/meminfo") as handle:
        info = dict(line.split(":", 1) for line in handle)
    return int(info["MemAvailable"].split()[0]) * 1024


def bench_dim(dim, setting, scale, nccl_scale, workdir, ops, repeat):
    """Every op with both implementations (and the two commands), ``repeat`` times interleaved; best of each."""
    folders = {}
    for op in ops:
        s = nccl_scale if op == "nccl" else scale
        folders[op] = folder = os.path.join(workdir, f"f{dim}_s{s}")
        if not os.path.exists(os.path.join(folder, "feat.npy")):
            os.makedirs(folder, exist_ok=True)
            n, c = round(SETTINGS[setting]["images"] * s), max(2, round(SETTINGS[setting]["classes"] * s))
            print(f"generating {n} × {dim} features, {c} classes in {folder} …", flush=True)
            generate(folder, n, c, dim, SETTINGS[setting]["sizes"], SETTINGS[setting]["shuffle"])
    with_tools = "avg" in ops and "denoise" in ops
    runs = {}
    for _ in range(repeat):
        for op in ops:
            for impl in ("ours", "loop"):
                runs.setdefault((op, impl), []).append(measure(op, impl, folders[op], int(0.85 * available_bytes())))
        if with_tools:
            for tool, run in measure_tools(folders["avg"], dim).items():
                runs.setdefault(("tools", tool), []).append(run)
    figures = {}
    for op in ops:
        file_bytes = os.path.getsize(os.path.join(folders[op], "feat.npy"))
        row = {"scale": nccl_scale if op == "nccl" else scale, "file_gb": round(file_bytes / 1e9, 3)}
        for impl in ("ours", "loop"):
            best, walls = _best(runs[(op, impl)])
            row[impl] = dict(_figures(*best, file_bytes), all_seconds=walls)
            _show(f"f{dim} {op} {impl}", row[impl])
        if not row["ours"]["error"] and not row["loop"]["error"]:
            row.update(compare(op, folders[op]))
            row["speedup"] = round(row["loop"]["seconds"] / row["ours"]["seconds"], 2)
            row["cpu_speedup"] = round(row["loop"]["cpu_seconds"] / row["ours"]["cpu_seconds"], 2)
        if op == "nccl":
            for key in ("seconds", "cpu_seconds"):
                row["ours"][f"extrapolated_full_{key}"] = round(row["ours"][key] / row["scale"] ** 2)
        figures[op] = row
        print(f"f{dim} {op}: {json.dumps({k: v for k, v in row.items() if k not in ('ours', 'loop')})}", flush=True)
    if with_tools and all(not figures[o][i]["error"] for o in ("avg", "denoise") for i in ("ours", "loop")):
        for key, name in (("seconds", "avg_plus_denoise_speedup"), ("cpu_seconds", "avg_plus_denoise_cpu_speedup")):
            ours_s = figures["avg"]["ours"][key] + figures["denoise"]["ours"][key]
            loop_s = figures["avg"]["loop"][key] + figures["denoise"]["loop"][key]
            figures[name] = round(loop_s / ours_s, 2)
        file_bytes = os.path.getsize(os.path.join(folders["avg"], "feat.npy"))
        tools = {}
        for tool in ("get_avg_feature.py", "denoise_credible.py"):
            best, walls = _best(runs[("tools", tool)])
            tools[tool] = dict(_figures(*best, file_bytes), all_seconds=walls)
            _show(f"f{dim} {tool}", tools[tool])
        figures["tools"] = tools
        if not any(t["error"] for t in tools.values()):
            before = figures["avg"]["loop"]["seconds"] + figures["denoise"]["loop"]["seconds"]
            after = sum(t["seconds"] for t in tools.values())
            figures["tools_avg_plus_denoise_speedup"] = round(before / after, 2)
            figures["tools_peak_rss_over_file"] = max(t["rss_over_file"] for t in tools.values())
            print(f"f{dim} steps 3+4, start-up included: before (published-style loop) {before:.2f} s, "
                  f"after (get_avg_feature.py + denoise_credible.py) {after:.2f} s: "
                  f"{figures['tools_avg_plus_denoise_speedup']:.2f}× faster; peak RSS "
                  f"{figures['tools_peak_rss_over_file']:.2f}× the feature file (loop "
                  f"{max(figures[o]['loop']['rss_over_file'] for o in ('avg', 'denoise')):.2f}×)", flush=True)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=SETTINGS, default="class70",
                        help="class70: MS1MV3 class70, sorted labels; shuffled: 1.35 M rows, 30k classes, shuffled")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the setting's rows and classes")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement, interleaved (best kept)")
    parser.add_argument("--nccl_scale", type=float, default=0.03, help="scale of the NCCL problem (cost ∝ scale²)")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--workdir", default=None, help="where to generate the files (default: a temp folder in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--child", nargs=5, metavar=("OP", "IMPL", "FEATURES", "LABELS", "RESULT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        ns = argparse.Namespace(op=args.child[0], impl=args.child[1], features=args.child[2],
                                labels=args.child[3], result=args.child[4])
        return child(ns)
    require(0 < args.scale <= 1 and 0 < args.nccl_scale <= 1, "--scale and --nccl_scale must be in (0, 1]")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_features_", dir="/tmp")
    require(args.repeat >= 1, "--repeat must be >= 1")
    need = max(args.dims) * 4 * SETTINGS[args.setting]["images"] * args.scale * 1.1
    if shutil.disk_usage(os.path.dirname(os.path.abspath(workdir))).free < need:
        raise UserError(f"not enough free disk under {workdir}: need about {need / 1e9:.1f} GB")
    figures = {"setting": args.setting, "cpu_cores": os.cpu_count(), "T": T,
               "load_average_at_start": os.getloadavg()[0]}
    try:
        for dim in args.dims:
            figures[f"f{dim}"] = bench_dim(dim, args.setting, args.scale, args.nccl_scale, workdir, args.ops,
                                           args.repeat)
            if not args.keep:
                for name in os.listdir(workdir):
                    shutil.rmtree(os.path.join(workdir, name))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
