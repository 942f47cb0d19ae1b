"""IJB-C evaluation speed at full size: ``ijbc_eval.py --restore_embs`` next to a straightforward implementation.

    python tools/benchmark/bench_ijbc.py [--dim 512] [--scale 1.0] [--pairs gallery-probe|uniform] [--seed 0]
        [--workdir DIR] [--repeat 1]

Builds an IJB-C-sized protocol with random embeddings (no images): 469,375 images in 23,124
templates with media (1–6 frames), G1 1,772 / G2 1,759 gallery templates (one per subject),
19,593 probe templates and 15,658,489 pairs (19,557 genuine), written as the insightface meta
files under ``<workdir>/data/IJBC/meta/`` and the embeddings as a ``-E -R`` result
(``embs.npz``). ``gallery-probe`` pairs a gallery template with a probe template, as IJB-C's
verification protocol does; ``uniform`` draws both sides from all templates (a denser Gram
matrix, the worst case for the vectorised scores). Image embeddings are subject centre + noise
(its scale drawn per template), so genuine and impostor scores overlap as for a real model.

"after": the toolkit's two commands as users run them, ``ijbc_eval.py --restore_embs embs.npz``
for 1:1 and then with ``-N`` for 1:N (each its own process: start-up, reading, metrics, table,
figure and result files included; the meta files are parsed once beforehand, so both read the
parse cache). "before": a straightforward implementation in one process (start-up included): it
reads the same ``embs.npz`` with ``np.load`` and the protocol as arrays (no parsing), then
per-template ``np.where`` and per-media means, pair scores by chunked row gathers,
``roc_curve`` on the raw scores, 1:N by a loop over probes with an argsort each. Both compute
the self-test of docs/evaluation.md with the default variant N0D1F1; their metrics are compared. Runs are
interleaved ``--repeat`` times and the fastest of each kept. Wall time and peak RSS come from
``wait4``. The last output line is a JSON object of the figures.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from utils.errors import require, run_cli

SIZES = dict(images=469_375, gallery1=1_772, gallery2=1_759, probes=19_593, pairs=15_658_489, genuine=19_557)
FAR_KEYS = ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")
FPIR_KEYS = ("1e-4", "1e-3", "1e-2", "1e-1", "1")
TOPK = (1, 5, 10)


# --------------------------------------------------------------------------------------------- data
def build(folder, dim, scale, pairs_layout, seed):
    """Write the protocol (meta files under ``data/IJBC/meta`` and ``meta.npz``) and the embeddings (``embs.npz``)."""
    rng = np.random.default_rng(seed)
    n = {k: max(2, int(round(v * scale))) for k, v in SIZES.items()}
    num_gallery = n["gallery1"] + n["gallery2"]
    num_templates = num_gallery + n["probes"]
    template_subject = np.r_[np.arange(num_gallery), rng.integers(0, num_gallery, n["probes"])]
    template_ids = rng.permutation(num_templates) + 1                 # arbitrary ids, as in the real files
    owner = np.sort(np.r_[np.arange(num_templates), rng.integers(0, num_templates, n["images"] - num_templates)])
    media = owner * 8 + np.minimum(rng.geometric(0.45, len(owner)) - 1, 7)  # a few media per template
    media_ids = np.unique(media, return_inverse=True)[1] + 1

    centres = rng.normal(size=(num_gallery, dim)).astype(np.float32)
    noise = rng.uniform(1, 6, num_templates).astype(np.float32)       # image quality varies by template
    embs = np.empty((len(owner), dim), np.float32)
    embs_f = np.empty((len(owner), dim), np.float32)
    for start in range(0, len(owner), 1 << 16):
        part = slice(start, start + (1 << 16))
        base = centres[template_subject[owner[part]]]
        embs[part] = base + noise[owner[part], None] * rng.normal(size=base.shape).astype(np.float32)
        embs_f[part] = embs[part] + rng.normal(0, 0.3, base.shape).astype(np.float32)
    np.savez(os.path.join(folder, "embs.npz"), embs=embs, embs_f=embs_f)
    del embs, embs_f

    probes = np.arange(num_gallery, num_templates)
    genuine_probes = rng.choice(probes, n["genuine"], replace=n["genuine"] > len(probes))
    genuine = np.stack([template_subject[genuine_probes], genuine_probes], 1)  # gallery template of subject = subject
    wanted = n["pairs"] - n["genuine"]
    if pairs_layout == "uniform":
        side1, side2 = np.arange(num_templates), np.arange(num_templates)
    else:
        side1, side2 = np.arange(num_gallery), probes
    flat = np.unique(rng.integers(0, len(side1) * len(side2), int(wanted * 1.2) + 1000))
    impostor = np.stack([side1[flat // len(side2)], side2[flat % len(side2)]], 1)
    impostor = impostor[template_subject[impostor[:, 0]] != template_subject[impostor[:, 1]]]
    impostor = impostor[np.sort(rng.choice(len(impostor), wanted, replace=len(impostor) < wanted))]
    pairs = np.concatenate([genuine, impostor])
    labels = np.r_[np.ones(len(genuine), np.int8), np.zeros(len(impostor), np.int8)]
    order = np.lexsort((template_ids[pairs[:, 1]], template_ids[pairs[:, 0]]))

    g1, g2 = np.arange(n["gallery1"]), np.arange(n["gallery1"], num_gallery)
    arrays = dict(templates=template_ids[owner], medias=media_ids,
                  scores=rng.uniform(0.5, 1.0, len(owner)).astype(np.float32),
                  t1=template_ids[pairs[order, 0]], t2=template_ids[pairs[order, 1]], labels=labels[order],
                  g1_templates=template_ids[g1], g1_subjects=template_subject[g1] + 1,
                  g2_templates=template_ids[g2], g2_subjects=template_subject[g2] + 1,
                  probe_templates=template_ids[probes], probe_subjects=template_subject[probes] + 1)
    np.savez(os.path.join(folder, "meta.npz"), **arrays)
    write_meta_files(os.path.join(folder, "data", "IJBC", "meta"), arrays, rng)
    return dict(images=len(owner), templates=num_templates, media=int(media_ids.max()), pairs=len(labels),
                genuine=int(labels.sum()), gallery_G1=len(g1), gallery_G2=len(g2), probes=len(probes), dim=dim)


def write_meta_files(folder, a, rng):
    """The insightface IJB-C meta files of the protocol ``a`` (image ``<i>.jpg``; landmarks are arbitrary)."""
    import pandas as pd

    os.makedirs(folder, exist_ok=True)
    names = [f"{i}.jpg" for i in range(len(a["templates"]))]
    frame = pd.DataFrame({"name": names, "t": a["templates"], "m": a["medias"]})
    frame.to_csv(os.path.join(folder, "ijbc_face_tid_mid.txt"), sep=" ", header=False, index=False)
    marks = pd.DataFrame(rng.uniform(30, 80, (len(names), 10)).round(3))
    marks.insert(0, "name", names)
    marks["score"] = a["scores"]
    marks.to_csv(os.path.join(folder, "ijbc_name_5pts_score.txt"), sep=" ", header=False, index=False,
                 float_format="%.9g")
    pd.DataFrame({"t1": a["t1"], "t2": a["t2"], "label": a["labels"]}).to_csv(
        os.path.join(folder, "ijbc_template_pair_label.txt"), sep=" ", header=False, index=False)
    for name, key in (("gallery_G1", "g1"), ("gallery_G2", "g2"), ("probe_mixed", "probe")):
        pd.DataFrame({"TEMPLATE_ID": a[f"{key}_templates"], "SUBJECT_ID": a[f"{key}_subjects"]}).to_csv(
            os.path.join(folder, f"ijbc_1N_{name}.csv"), index=False)


def load(folder):
    """The protocol arrays and the embeddings, read fully as a straightforward script does."""
    with np.load(os.path.join(folder, "meta.npz"), allow_pickle=False) as meta:
        meta = {k: meta[k] for k in meta.files}
    with np.load(os.path.join(folder, "embs.npz"), allow_pickle=False) as saved:
        return meta, saved["embs"], saved["embs_f"]


# --------------------------------------------------------------------------------------------- baseline
def baseline_templates(meta, embs, embs_f):
    img_feats = (np.asarray(embs) + np.asarray(embs_f)) * meta["scores"][:, None]
    templates, medias = meta["templates"], meta["medias"]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for i, template in enumerate(unique_templates):
        (rows,) = np.where(templates == template)
        feats, media_of = img_feats[rows], medias[rows]
        media_feats = [feats[media_of == m].mean(0, dtype=np.float64) for m in np.unique(media_of)]
        template_feats[i] = np.sum(media_feats, axis=0)
    template_feats /= np.sqrt(np.sum(template_feats ** 2, -1, keepdims=True))
    template2id = np.zeros(unique_templates.max() + 1, dtype=int)
    template2id[unique_templates] = np.arange(len(unique_templates))
    return template_feats, template2id


def baseline_scores(template_feats, template2id, t1, t2, batch=100_000):
    scores = np.zeros(len(t1))
    for start in range(0, len(t1), batch):
        sel = slice(start, start + batch)
        scores[sel] = np.sum(template_feats[template2id[t1[sel]]] * template_feats[template2id[t2[sel]]], -1)
    return scores


def baseline_verification(labels, scores):
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fpr_r, tpr_r = np.flipud(fpr), np.flipud(tpr)
    tar = {key: float(tpr_r[np.argmin(np.abs(fpr_r - float(key)))]) for key in FAR_KEYS}
    return {"TAR@FAR": tar, "AUC": float(auc(fpr, tpr))}


def baseline_search(gallery, gallery_subjects, probes, probe_subjects, with_tpir=True):
    sims = np.dot(probes, gallery.T)
    first = {}
    for j, subject in enumerate(gallery_subjects):
        first.setdefault(subject, j)
    hits, mated, impostor = {k: 0 for k in TOPK}, [], []
    for i in range(len(probes)):
        row = sims[i]
        if probe_subjects[i] not in first:
            impostor.append(row.max())
            continue
        target = first[probe_subjects[i]]
        order = np.argsort(-row, kind="stable")
        rank = int(np.where(order == target)[0][0])
        for k in TOPK:
            hits[k] += rank < k
        others = row[gallery_subjects != probe_subjects[i]]
        mated.append((row[target], others.max() if len(others) else -np.inf))
    result = {f"top{k}": hits[k] / len(mated) for k in TOPK}
    if with_tpir:
        impostor.sort(reverse=True)
        tpir = {}
        for key in FPIR_KEYS:
            position = max(math.floor(len(impostor) * float(key) + 1e-9) - 1, 0)
            threshold = impostor[position] if impostor else -np.inf
            tpir[key] = sum(1 for s, other in mated if s > other and s > threshold) / len(mated)
        result["TPIR@FPIR"] = tpir
    return result, hits


def run_baseline(meta, embs, embs_f):
    seconds = {}
    start = time.perf_counter()
    feats, template2id = baseline_templates(meta, embs, embs_f)
    seconds["templates"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = baseline_scores(feats, template2id, meta["t1"], meta["t2"])
    seconds["pair_scores"] = time.perf_counter() - start
    start = time.perf_counter()
    one_to_one = baseline_verification(meta["labels"], scores)
    seconds["roc"] = time.perf_counter() - start
    start = time.perf_counter()
    probes, subjects = feats[template2id[meta["probe_templates"]]], meta["probe_subjects"]
    report, total_hits = {}, {k: 0 for k in TOPK}
    for g in ("G1", "G2"):
        gallery = feats[template2id[meta[f"{g.lower()}_templates"]]]
        report[g], hits = baseline_search(gallery, meta[f"{g.lower()}_subjects"], probes, subjects)
        for k in TOPK:
            total_hits[k] += hits[k]
    one_to_n = {f"top{k}": total_hits[k] / len(subjects) for k in TOPK}
    one_to_n["TPIR@FPIR"] = {key: (report["G1"]["TPIR@FPIR"][key] + report["G2"]["TPIR@FPIR"][key]) / 2
                             for key in FPIR_KEYS}
    union = np.concatenate([feats[template2id[meta["g1_templates"]]], feats[template2id[meta["g2_templates"]]]])
    union_subjects = np.concatenate([meta["g1_subjects"], meta["g2_subjects"]])
    one_to_n["mixed"] = baseline_search(union, union_subjects, probes, subjects, with_tpir=False)[0]
    one_to_n.update(report)
    seconds["one_to_n"] = time.perf_counter() - start
    return seconds, one_to_one, one_to_n, scores


# --------------------------------------------------------------------------------------------- driver
def child(folder):
    """The baseline, as one process: load, 1:1 and 1:N; writes its figures and scores to ``folder``."""
    start = time.perf_counter()
    meta, embs, embs_f = load(folder)
    load_seconds = time.perf_counter() - start
    seconds, one_to_one, one_to_n, scores = run_baseline(meta, embs, embs_f)
    np.save(os.path.join(folder, "scores_baseline.npy"), scores)
    with open(os.path.join(folder, "result_baseline.json"), "w") as handle:
        json.dump(dict(seconds=dict(load=load_seconds, **seconds), one_to_one=one_to_one, one_to_n=one_to_n),
                  handle)


def run_measured(command):
    """Run ``command`` (output discarded); return (wall seconds, peak RSS GiB, CPU seconds)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        errors = proc.stderr.read().decode(errors="replace")
    seconds = time.perf_counter() - start
    require(os.waitstatus_to_exitcode(status) == 0, f"{' '.join(command)} failed: {errors.strip()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024 / 2 ** 30, usage.ru_utime + usage.ru_stime


def toolkit_command(folder, one_to_n):
    stem = os.path.join(folder, f"toolkit_{'1N' if one_to_n else '11'}")
    return [sys.executable, os.path.join(ROOT, "tools", "ijbc_eval", "ijbc_eval.py"), "--restore_embs",
            os.path.join(folder, "embs.npz"), "-d", os.path.join(folder, "data"), "-R", stem + ".npz",
            *(["-N"] if one_to_n else [])], stem


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            if key.startswith("num_"):
                continue
            out.update(_flatten(inner, f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): float(value)}


def compare(a, b):
    """Largest absolute difference between two nested result dicts (same keys; NaN equals NaN)."""
    fa, fb = _flatten(a), _flatten(b)
    require(set(fa) == set(fb), f"result keys differ: {sorted(set(fa) ^ set(fb))}")
    return max(0.0 if (math.isnan(fa[k]) and math.isnan(fb[k])) else abs(fa[k] - fb[k]) for k in fa)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the IJB-C sizes (quick runs)")
    parser.add_argument("--pairs", choices=("gallery-probe", "uniform"), default="gallery-probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each implementation, interleaved (best kept)")
    parser.add_argument("--workdir", help="keep the generated protocol here and reuse it on later runs "
                                          "(default: a temporary folder)")
    parser.add_argument("--child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    require(0 < args.scale <= 1 and args.dim >= 1 and args.repeat >= 1,
            "--scale must be in (0, 1], --dim and --repeat positive")
    with tempfile.TemporaryDirectory(prefix="bench_ijbc_") as tmp:
        folder = args.workdir or tmp
        sizes_file = os.path.join(folder, "sizes.json")
        start = time.perf_counter()
        if os.path.isfile(sizes_file):
            with open(sizes_file) as handle:
                sizes = json.load(handle)
            require(sizes["dim"] == args.dim and sizes["pairs_layout"] == args.pairs and sizes.get("version") == 2,
                    f"--workdir {folder} holds a protocol with other options ({sizes}); use another folder")
        else:
            os.makedirs(folder, exist_ok=True)
            sizes = dict(build(folder, args.dim, args.scale, args.pairs, args.seed), pairs_layout=args.pairs,
                         version=2)
            with open(sizes_file, "w") as handle:
                json.dump(sizes, handle)
        print(f"protocol: {sizes} (ready in {time.perf_counter() - start:.0f} s)", flush=True)
        for one_to_n in (False, True):   # parse the meta files once: the timed runs read the parse cache
            run_measured(toolkit_command(folder, one_to_n)[0])
        runs = {"1:1": [], "1:N": [], "baseline": []}
        for _ in range(args.repeat):
            for name, one_to_n in (("1:1", False), ("1:N", True)):
                runs[name].append(run_measured(toolkit_command(folder, one_to_n)[0]))
            runs["baseline"].append(run_measured([sys.executable, os.path.abspath(__file__), "--child", folder]))
        best = {name: min(r) for name, r in runs.items()}
        results = {}
        for name, one_to_n in (("1:1", False), ("1:N", True)):
            with open(toolkit_command(folder, one_to_n)[1] + ".json") as handle:
                results[name] = json.load(handle)
        with open(os.path.join(folder, "result_baseline.json")) as handle:
            slow = json.load(handle)
        with np.load(toolkit_command(folder, False)[1] + ".npz", allow_pickle=False) as saved:
            ours_scores = saved["scores"][0]
        score_diff = float(np.abs(ours_scores - np.load(os.path.join(folder, "scores_baseline.npy"))).max())
    one_to_one = {k: results["1:1"][k] for k in ("TAR@FAR", "AUC")}
    one_to_n = {k: results["1:N"][k] for k in slow["one_to_n"]}
    diff = max(compare(one_to_one, slow["one_to_one"]), compare(one_to_n, slow["one_to_n"]))
    after = best["1:1"][0] + best["1:N"][0]
    before = best["baseline"][0]
    cpu_after, cpu_before = best["1:1"][2] + best["1:N"][2], best["baseline"][2]
    figures = dict(
        sizes=sizes, threads=os.environ.get("OMP_NUM_THREADS"), cpus=os.cpu_count(),
        load_average=os.getloadavg()[0],
        toolkit_seconds={"1:1": round(best["1:1"][0], 2), "1:N": round(best["1:N"][0], 2), "total": round(after, 2)},
        toolkit_all_seconds={k: [round(r[0], 2) for r in runs[k]] for k in ("1:1", "1:N")},
        baseline_seconds=dict({k: round(v, 2) for k, v in slow["seconds"].items()}, total=round(before, 2)),
        baseline_all_seconds=[round(r[0], 2) for r in runs["baseline"]],
        speedup=round(before / after, 2),
        toolkit_cpu_seconds=round(cpu_after, 2), baseline_cpu_seconds=round(cpu_before, 2),
        cpu_speedup=round(cpu_before / cpu_after, 2),
        toolkit_peak_rss_gb=round(max(best["1:1"][1], best["1:N"][1]), 2),
        baseline_peak_rss_gb=round(best["baseline"][1], 2),
        max_metric_difference=diff, max_score_difference_float32=score_diff,
        tar_at_far_1e_4=results["1:1"]["TAR@FAR"]["1e-4"], top1=results["1:N"]["top1"])
    print(f"before (straightforward, one process): {before:.1f} s ({cpu_before:.1f} CPU s), peak RSS {best['baseline'][1]:.2f} GiB "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in slow['seconds'].items())})")
    print(f"after (ijbc_eval.py --restore_embs, 1:1 then -N): {after:.1f} s ({best['1:1'][0]:.1f} s + "
          f"{best['1:N'][0]:.1f} s; {cpu_after:.1f} CPU s), peak RSS {figures['toolkit_peak_rss_gb']:.2f} GiB")
    print(f"speed-up {figures['speedup']}× (CPU time {figures['cpu_speedup']}×); metrics identical to {diff:.1e}, scores to {score_diff:.1e} (float32 "
          f"saved scores); TAR@FAR=1e-4 {figures['tar_at_far_1e_4']:.4f}, top-1 {figures['top1']:.4f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
