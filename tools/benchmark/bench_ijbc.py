"""IJB-C evaluation speed at full size: the toolkit's vectorised metrics next to a straightforward loop version.

    python tools/benchmark/bench_ijbc.py [--dim 512] [--scale 1.0] [--pairs gallery-probe|uniform] [--seed 0]
        [--workdir DIR]

Builds an IJB-C-sized protocol with random embeddings (no images): 469,375 images in 23,124
templates with media (1–6 frames), G1 1,772 / G2 1,759 gallery templates (one per subject),
19,593 probe templates and 15,658,489 pairs (19,557 genuine). ``gallery-probe`` pairs a gallery
template with a probe template, as IJB-C's verification protocol does; ``uniform`` draws both
sides from all templates (a denser Gram matrix, the worst case for the vectorised scores).
Image embeddings are subject centre + noise (its scale drawn per template), so genuine and
impostor scores overlap as for a real model.

Both implementations run from the same files, each in its own process (peak RSS read from
``ru_maxrss``), and compute the self-test of SPEC §5 with the default variant N0D1F1: template
features, 1:1 scores, TAR@FAR and AUC, 1:N top-k and TPIR@FPIR for G1, G2, overall and mixed.
The baseline is the way research code usually writes it: per-template ``np.where`` and per-media
means, pair scores by chunked row gathers, ``roc_curve`` on the raw scores, 1:N by a loop over probes
with an argsort each. The last output line is a JSON object of the figures.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from utils.errors import require, run_cli  # noqa: E402

SIZES = dict(images=469_375, gallery1=1_772, gallery2=1_759, probes=19_593, pairs=15_658_489, genuine=19_557)
FAR_KEYS = ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")
FPIR_KEYS = ("1e-4", "1e-3", "1e-2", "1e-1", "1")
TOPK = (1, 5, 10)


# --------------------------------------------------------------------------------------------- data
def build(folder, dim, scale, pairs_layout, seed):
    """Write the protocol (``meta.npz``) and image embeddings (``embs.npy``, ``embs_f.npy``) to ``folder``."""
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
    embs = np.lib.format.open_memmap(os.path.join(folder, "embs.npy"), "w+", np.float32, (len(owner), dim))
    embs_f = np.lib.format.open_memmap(os.path.join(folder, "embs_f.npy"), "w+", np.float32, (len(owner), dim))
    for start in range(0, len(owner), 1 << 16):
        part = slice(start, start + (1 << 16))
        base = centres[template_subject[owner[part]]]
        embs[part] = base + noise[owner[part], None] * rng.normal(size=base.shape).astype(np.float32)
        embs_f[part] = embs[part] + rng.normal(0, 0.3, base.shape).astype(np.float32)
    embs.flush()
    embs_f.flush()

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
    np.savez(os.path.join(folder, "meta.npz"), templates=template_ids[owner], medias=media_ids,
             scores=rng.uniform(0.5, 1.0, len(owner)).astype(np.float32),
             t1=template_ids[pairs[order, 0]], t2=template_ids[pairs[order, 1]], labels=labels[order],
             g1_templates=template_ids[g1], g1_subjects=template_subject[g1] + 1,
             g2_templates=template_ids[g2], g2_subjects=template_subject[g2] + 1,
             probe_templates=template_ids[probes], probe_subjects=template_subject[probes] + 1)
    return dict(images=len(owner), templates=num_templates, media=int(media_ids.max()), pairs=len(labels),
                genuine=int(labels.sum()), gallery_G1=len(g1), gallery_G2=len(g2), probes=len(probes), dim=dim)


def load(folder):
    with np.load(os.path.join(folder, "meta.npz"), allow_pickle=False) as meta:
        meta = {k: meta[k] for k in meta.files}
    return meta, np.load(os.path.join(folder, "embs.npy"), mmap_mode="r", allow_pickle=False), \
        np.load(os.path.join(folder, "embs_f.npy"), mmap_mode="r", allow_pickle=False)


# --------------------------------------------------------------------------------------------- toolkit
def run_toolkit(meta, embs, embs_f):
    from tools.ijbc_eval import metrics

    seconds = {}
    start = time.perf_counter()
    templates = metrics.Templates(meta["templates"], meta["medias"])
    feats = templates.features(embs, embs_f, meta["scores"])
    seconds["templates"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = metrics.pair_scores(feats, feats, templates.index(meta["t1"]), templates.index(meta["t2"]))
    seconds["pair_scores"] = time.perf_counter() - start
    start = time.perf_counter()
    one_to_one = metrics.verification(meta["labels"], scores)[0]
    seconds["roc"] = time.perf_counter() - start
    start = time.perf_counter()
    galleries = {g: (feats[templates.index(meta[f"{g.lower()}_templates"])], meta[f"{g.lower()}_subjects"])
                 for g in ("G1", "G2")}
    one_to_n = metrics.identification_report(galleries, feats[templates.index(meta["probe_templates"])],
                                             meta["probe_subjects"])[0]
    seconds["one_to_n"] = time.perf_counter() - start
    return seconds, one_to_one, one_to_n, scores


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
def child(kind, folder):
    """Run one implementation; write its figures and scores to ``folder``."""
    import sklearn.metrics  # noqa: F401  (imported before timing; both implementations use it)

    meta, embs, embs_f = load(folder)
    runner = run_toolkit if kind == "toolkit" else run_baseline
    seconds, one_to_one, one_to_n, scores = runner(meta, embs, embs_f)
    np.save(os.path.join(folder, f"scores_{kind}.npy"), scores)
    seconds["total"] = sum(seconds.values())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
    with open(os.path.join(folder, f"result_{kind}.json"), "w") as handle:
        json.dump(dict(seconds=seconds, peak_rss_gb=peak_gb, one_to_one=one_to_one, one_to_n=one_to_n), handle)


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
    """Largest absolute difference between two nested result dicts (same keys)."""
    fa, fb = _flatten(a), _flatten(b)
    require(set(fa) == set(fb), f"result keys differ: {sorted(set(fa) ^ set(fb))}")
    return max(abs(fa[k] - fb[k]) for k in fa)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the IJB-C sizes (quick runs)")
    parser.add_argument("--pairs", choices=("gallery-probe", "uniform"), default="gallery-probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the generated protocol here and reuse it on later runs "
                                          "(default: a temporary folder)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    require(0 < args.scale <= 1 and args.dim >= 1, "--scale must be in (0, 1] and --dim positive")
    with tempfile.TemporaryDirectory(prefix="bench_ijbc_") as tmp:
        folder = args.workdir or tmp
        sizes_file = os.path.join(folder, "sizes.json")
        start = time.perf_counter()
        if os.path.isfile(sizes_file):
            with open(sizes_file) as handle:
                sizes = json.load(handle)
            require(sizes["dim"] == args.dim and sizes["pairs_layout"] == args.pairs,
                    f"--workdir {folder} holds a protocol with other options ({sizes}); use another folder")
        else:
            os.makedirs(folder, exist_ok=True)
            sizes = dict(build(folder, args.dim, args.scale, args.pairs, args.seed), pairs_layout=args.pairs)
            with open(sizes_file, "w") as handle:
                json.dump(sizes, handle)
        print(f"protocol: {sizes} (ready in {time.perf_counter() - start:.0f} s)", flush=True)
        results = {}
        for kind in ("toolkit", "baseline"):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, folder], check=True)
            with open(os.path.join(folder, f"result_{kind}.json")) as handle:
                results[kind] = json.load(handle)
            r = results[kind]
            stages = ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())
            print(f"{kind:9s}: {stages}; peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        fast, slow = results["toolkit"], results["baseline"]
        score_diff = float(np.abs(np.load(os.path.join(folder, "scores_toolkit.npy"), allow_pickle=False)
                                  - np.load(os.path.join(folder, "scores_baseline.npy"), allow_pickle=False)).max())
    diff = max(compare(fast["one_to_one"], slow["one_to_one"]), compare(fast["one_to_n"], slow["one_to_n"]))
    figures = dict(
        sizes=sizes, threads=os.environ.get("OMP_NUM_THREADS"), cpus=os.cpu_count(),
        toolkit_seconds={k: round(v, 3) for k, v in fast["seconds"].items()},
        baseline_seconds={k: round(v, 3) for k, v in slow["seconds"].items()},
        speedup=round(slow["seconds"]["total"] / fast["seconds"]["total"], 2),
        toolkit_peak_rss_gb=round(fast["peak_rss_gb"], 2), baseline_peak_rss_gb=round(slow["peak_rss_gb"], 2),
        max_metric_difference=diff, max_score_difference=score_diff,
        tar_at_far_1e_4=fast["one_to_one"]["TAR@FAR"]["1e-4"], top1=fast["one_to_n"]["top1"])
    print(f"speed-up {figures['speedup']}× (toolkit {fast['seconds']['total']:.1f} s, baseline "
          f"{slow['seconds']['total']:.1f} s); metrics identical to {diff:.1e}, scores to {score_diff:.1e}; "
          f"TAR@FAR=1e-4 {figures['tar_at_far_1e_4']:.4f}, top-1 {figures['top1']:.4f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    run_cli(main)
