"""IJB-C / IJB-B evaluation: 1:1 verification and 1:N identification, self-test and cross-test (protocol: docs/evaluation.md).

    python tools/ijbc_eval/ijbc_eval.py -m=NEW.pt -net=r50                              # self 1:1
    python tools/ijbc_eval/ijbc_eval.py -m=NEW.pt -net=r50 -N                           # self 1:N
    python tools/ijbc_eval/ijbc_eval.py -m=NEW.pt -net=r50 -m_old=OLD.pt -old_net=r18    # cross 1:1
    python tools/ijbc_eval/ijbc_eval.py -m=NEW.pt -net=r50 -m_old=OLD.pt -old_net=r18 -N # cross 1:N

Cross-test: the gallery side (1:1 ``template1``, 1:N galleries) uses the old model, the query side
the new one. Prints a markdown table and writes a ROC (1:1) or DIR (1:N) figure; ``-R PATH.npz``
also writes the scores or curves (and embeddings with ``-E``) and ``PATH.json``. See docs/evaluation.md.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from tools.compat_eval import decision
from tools.ijbc_eval import CHUNK_IMAGES, bootstrap, metrics
from tools.ijbc_eval.meta import SUBSETS, check_images, load_meta
from utils.chunk_cache import ChunkCache, file_stamp
from utils.config import add_launcher_args
from utils.deployed import IJB_PREPROCESSING, parse_preprocessing
from utils.errors import ArgumentParser, require, run_cli
from utils.io import atomic_np_savez, atomic_open, npz_member_memmap, numpy_read_errors, safe_np_load

DEFAULT_DATA = os.path.join(ROOT, "dataset", "IJB_release")
RESULTS_DIR = os.path.join(ROOT, "work_dirs", "ijb_results")
EMBEDDING_KEYS = ("embs", "embs_f", "embs_old", "embs_f_old")


def _open_npz(path):
    """A saved ``.npz`` result (read its members with :func:`_array`)."""
    data = safe_np_load(path)
    require(hasattr(data, "files"), f"{path}: expected an .npz result saved with -R")
    return data


def _array(data, key, path):
    """``data[key]`` of an opened ``.npz``; pickled or corrupt members raise UserError."""
    with numpy_read_errors(f"'{key}' from {path}"):
        return data[key]


def _embeddings(data, key, path):
    """A float32 embedding array of a saved result: memory-mapped where stored as such (read as used)."""
    mapped = npz_member_memmap(path, key)
    if mapped is not None and mapped.dtype == np.float32:
        return mapped
    return np.asarray(_array(data, key, path), np.float32)


def _restore(path, num_images, same_sizes=True):
    """``(new, old)`` embedding pairs from a saved result; ``old`` is None without ``embs_old``."""
    with _open_npz(path) as data:
        require("embs" in data.files and "embs_f" in data.files,
                f"{path}: holds no 'embs'/'embs_f' arrays (save them with -E -R)")
        arrays = {k: _embeddings(data, k, path) for k in EMBEDDING_KEYS if k in data.files}
    require(("embs_old" in arrays) == ("embs_f_old" in arrays), f"{path}: holds only one of embs_old/embs_f_old")
    for key, value in arrays.items():
        require(value.ndim == 2, f"{path}: '{key}' must be a 2-D array, got shape {value.shape}")
        require(len(value) == num_images, f"{path}: '{key}' has {len(value)} rows but the image list has "
                                          f"{num_images} images (embeddings of another data set?)")
    require(arrays["embs_f"].shape == arrays["embs"].shape, f"{path}: 'embs_f' and 'embs' differ in shape")
    new = (arrays["embs"], arrays["embs_f"])
    old = (arrays["embs_old"], arrays["embs_f_old"]) if "embs_old" in arrays else None
    if old is not None and same_sizes:
        _check_sizes(old[0].shape[1], new[0].shape[1], f"{path}: embs_old", f"{path}: embs")
    return new, old


def _check_sizes(old_size, new_size, old_name, new_name):
    require(old_size == new_size, f"cross-test needs equal embedding sizes: {old_name} gives {old_size}-d, "
                                  f"{new_name} {new_size}-d")


def _embed(meta, model_file, network, model_file_old, network_old, options, local_rank=None):
    """``(new, old)`` embedding pairs from the models (``old`` None for a self-test), and the chunk cache.

    Finished chunks of images are kept in a :class:`ChunkCache` (removed by the caller once the
    results are written), so an interrupted evaluation resumes its embedding. Under torchrun /
    torch.distributed.launch the images are shared among the ranks; ranks other than 0 get None.
    """
    from tools.ijbc_eval.embed import Embedder, extract  # torch is loaded only when images are embedded
    from utils.distributed import fail_together, launched

    with launched(local_rank, options["device"], options["dist_timeout_minutes"]) as dist_info:
        device = dist_info.device if dist_info else options["device"]
        with fail_together():   # images or a model missing on one node stop every process at once
            check_images(meta)
            embedders = [Embedder(model_file, network, options["width"], options["input_size"], device,
                                  options["preprocess"], options["amp"])]
            if model_file_old:
                embedders.append(Embedder(model_file_old, network_old, options["old_width"],
                                          options["old_input_size"], device, options["old_preprocess"], options["amp"]))
                if not options["transform"]:
                    _check_sizes(embedders[1].embedding_size, embedders[0].embedding_size, model_file_old,
                                 model_file)
        inputs = dict(images=os.path.abspath(meta.image_folder), models=[e.describe() for e in embedders],
                      meta=[file_stamp(meta.files[key]) for key in ("tid_mid", "landmarks")])
        cache = ChunkCache(f"ijb_embed/{meta.subset}", inputs, len(meta), options["chunk_size"],
                           options["cache_dir"])
        outputs = extract(meta, embedders, options["batch_size"], options["num_workers"], cache, dist_info)
    if outputs is None:
        return None, None, None
    return outputs[0], (outputs[1] if model_file_old else None), cache


def apply_transform(path, old, new_size):
    """The old model's ``(embs, embs_f)`` mapped by the gallery transform in ``path`` into the new space."""
    from tools.transform import transforms

    model, saved = transforms.load(path)
    require(saved["out_dim"] == new_size, f"--transform {path} maps into a {saved['out_dim']}-d space, but the new "
                                          f"model makes {new_size}-d embeddings")
    require(saved["in_dim"] == old[0].shape[1], f"--transform {path} maps {saved['in_dim']}-d old embeddings, but "
                                                f"the old model makes {old[0].shape[1]}-d ones")
    return tuple(transforms.transform_rows(model, part) for part in old)


def _verification(meta, templates, new, old, variants):
    """Per-variant 1:1 summaries and ROC curves, the arrays to save, and the default variant's pair
    scores (what :func:`intervals` resamples)."""
    idx1, idx2 = templates.index(meta.pairs["t1"]), templates.index(meta.pairs["t2"])
    summaries, curves, scores = {}, {}, []
    for variant in variants:
        feats_new = templates.features(*new, meta.scores, variant)
        feats_old = templates.features(*old, meta.scores, variant) if old else feats_new
        score = metrics.pair_scores(feats_old, feats_new, idx1, idx2)
        require(np.isfinite(score).all(), "non-finite similarity scores: the embeddings contain NaN or inf")
        summaries[variant], curves[variant] = metrics.verification(meta.pairs["labels"], score)
        scores.append(score.astype(np.float32))
        if variant == metrics.DEFAULT_VARIANT:
            found = score
    arrays = dict(scores=np.stack(scores), labels=meta.pairs["labels"])
    return summaries, curves, arrays, found


def _identification(meta, templates, new, old, variants):
    """Per-variant 1:N reports and TPIR curves, the arrays to save, and the default variant's
    searches (what :func:`intervals` resamples)."""
    summaries, curves = {}, {}
    for variant in variants:
        feats_new = templates.features(*new, meta.scores, variant)
        feats_old = templates.features(*old, meta.scores, variant) if old else feats_new
        require(np.isfinite(feats_new).all() and np.isfinite(feats_old).all(),
                "non-finite template features: the embeddings contain NaN or inf")
        galleries = {name: (feats_old[templates.index(g["templates"])], g["subjects"])
                     for name, g in meta.galleries.items()}
        probes = feats_new[templates.index(meta.probes["templates"])]
        searches = metrics.gallery_searches(galleries, probes, meta.probes["subjects"])
        summaries[variant], curves[variant] = metrics.searches_report(*searches)
        if variant == metrics.DEFAULT_VARIANT:
            found = searches
    arrays = dict(fpir=metrics.CURVE_FPIR, tpir=np.stack([curves[v]["mean"] for v in variants]),
                  **{f"tpir_{name}": np.stack([curves[v][name] for v in variants]) for name in meta.galleries})
    return summaries, curves, arrays, found


def _template_subjects(data_path, subset, template_ids):
    """Subject of each 1:1 template id, read from the 1:N lists (the pair list names no subjects)."""
    lists = load_meta(data_path, subset, one_to_n=True)
    tables = list(lists.galleries.values()) + [lists.probes]
    templates = np.concatenate([t["templates"] for t in tables])
    subjects = np.concatenate([t["subjects"] for t in tables])
    order = np.argsort(templates, kind="stable")
    templates, subjects = templates[order], subjects[order]
    pos = np.minimum(np.searchsorted(templates, template_ids), len(templates) - 1)
    missing = templates[pos] != template_ids
    require(not missing.any(), f"--bootstrap: 1:1 template {template_ids[missing][0] if missing.any() else ''} "
                               f"is in no 1:N list of {subset}, so its subject is unknown")
    return subjects[pos]


def replicate_figures(meta, found, data_path, resamples, seed=0):
    """The default variant's figures over ``resamples`` subject resamples (nested dict of (B,) arrays).

    ``found``: what :func:`_verification` / :func:`_identification` computed for the default variant
    (pair scores; gallery searches). 1:1: subjects are those of both templates of each pair (a
    resampled subject brings all its pairs, see :mod:`bootstrap`); 1:N: the galleries stay, probe
    subjects are resampled.
    """
    if meta.pairs is not None:
        subjects = _template_subjects(data_path, meta.subset, np.concatenate([meta.pairs["t1"], meta.pairs["t2"]]))
        s1, s2 = np.split(subjects, 2)   # one read of the 1:N lists for both templates of every pair
        num_subjects, (i1, i2) = bootstrap.subject_index(s1, s2)
        counts = bootstrap.subject_counts(num_subjects, resamples, seed)
        return bootstrap.verification_replicates(meta.pairs["labels"], found, i1, i2, counts)
    searches, union = found

    def statistic(weights):
        report = metrics.searches_report(searches, union, weights)[0]
        for name in searches:   # the counts behind a gallery's figures are not figures
            report[name] = {k: v for k, v in report[name].items() if not k.startswith("num_")}
        return report

    num_subjects, (index,) = bootstrap.subject_index(meta.probes["subjects"])
    counts = bootstrap.subject_counts(num_subjects, resamples, seed)
    return bootstrap.replicates(statistic, (row[index] for row in counts))


def flat_replicates(reps, prefix="bootstrap"):
    """``{"bootstrap/TAR@FAR/1e-3": (B,), …}``: the nested replicates as the flat arrays of a result file."""
    if isinstance(reps, dict):
        return {k: v for key, sub in reps.items() for k, v in flat_replicates(sub, f"{prefix}/{key}").items()}
    return {prefix: np.asarray(reps, np.float64)}


def _pct(value):
    return f"{100 * value:.2f}"


def _cell(value, interval=None):
    """A table cell in %: the value, with its interval ``[low, high]`` when there is one."""
    if interval is None:
        return _pct(value)
    return f"{_pct(value)} [{_pct(interval[0])}, {_pct(interval[1])}]"


def format_table(result):
    """Markdown table of a result dict (values in %; a TAR@FAR its impostor pairs cannot carry: ``n/m``)."""
    variants = result.get("variants") or {result["variant"]: result}
    title = f"{result['subset']} {result['protocol']} {result['test']}-test (%)"
    if result.get("data"):
        title += f" on {result['data']}"
    if "CI95" in result:
        title += f", [95 % percentile interval] over {result['bootstrap']['resamples']} subject resamples"
    note = ""
    if result["protocol"] == "1:1":
        pairs = result.get("num_impostor_pairs")
        note = decision.not_measurable_note([f"TAR@FAR={k}" for k in metrics.FAR_KEYS], pairs)
        lines = ["| variant | " + " | ".join(f"TAR@FAR={k}" for k in metrics.FAR_KEYS) + " | AUC |",
                 "|---" * (len(metrics.FAR_KEYS) + 2) + "|"]
        for name, r in variants.items():
            ci = result.get("CI95", {}) if name == result["variant"] else {}
            lines.append(f"| {name} | " + " | ".join(_cell(r["TAR@FAR"][k], ci.get("TAR@FAR", {}).get(k))
                                                     if decision.measurable(f"TAR@FAR={k}", pairs) else "n/m"
                                                     for k in metrics.FAR_KEYS)
                         + f" | {_cell(r['AUC'], ci.get('AUC'))} |")
    else:
        tops = [f"top{k}" for k in metrics.TOPK]
        lines = ["| variant | gallery | " + " | ".join(tops) + " | "
                 + " | ".join(f"TPIR@FPIR={k}" for k in metrics.FPIR_KEYS) + " |",
                 "|---" * (len(tops) + len(metrics.FPIR_KEYS) + 2) + "|"]
        galleries = SUBSETS[result["subset"]][1]
        for name, r in variants.items():
            ci = result.get("CI95", {}) if name == result["variant"] else {}
            for gallery, row, row_ci in [(g, r[g], ci.get(g, {})) for g in galleries] + [
                    ("overall", r, ci), ("mixed", r["mixed"], ci.get("mixed", {}))]:
                tpir, tpir_ci = row.get("TPIR@FPIR", {}), row_ci.get("TPIR@FPIR", {})
                lines.append(f"| {name} | {gallery} | " + " | ".join(_cell(row[t], row_ci.get(t)) for t in tops)
                             + " | " + " | ".join(_cell(tpir[k], tpir_ci.get(k)) if k in tpir else ""
                                                  for k in metrics.FPIR_KEYS) + " |")
    return "\n".join([title, ""] + lines + (["", f"n/m: {note}."] if note else [])) + "\n"


def _output_stem(save_result, subset, source, test, protocol):
    if save_result:
        return save_result[:-len(".npz")]
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(RESULTS_DIR, f"{subset}_{stem}_{test}_{'1N' if protocol == '1:N' else '11'}")


def evaluate(model_file=None, network="r50", data_path=DEFAULT_DATA, one_to_n=False, model_file_old=None,
             network_old="r18", subset="IJBC", batch_size=128, bunch=False, save_embeddings=False,
             restore_embs=None, save_result=None, force_reload=False, width=64, input_size=112, old_width=None,
             old_input_size=None, num_workers=None, device=None, plot=True, verbose=True, cache_dir=None,
             chunk_size=CHUNK_IMAGES, local_rank=None, resamples=0, bootstrap_seed=0, preprocess=None,
             old_preprocess=None, transform=None, amp=False, dist_timeout_minutes=None):
    """Evaluate a model (or saved embeddings) on IJB-C/IJB-B; returns the result dict written as JSON.

    1:1 → ``{"protocol", "subset", "test", "TAR@FAR": {"1e-6"…"1e-1"}, "AUC", …}``;
    1:N → ``{"protocol", "subset", "test", "top1", "top5", "top10", "TPIR@FPIR", "G1", "G2", "mixed", …}``.
    With ``bunch`` all eight N/D/F variants are added under ``"variants"`` (top level: N0D1F1).
    ``resamples`` > 0 adds ``"CI95"``: a 95 % subject-bootstrap interval ``[low, high]`` of every
    figure of the top level, nested like it (:func:`intervals`). ``preprocess``/``old_preprocess``:
    the input of a deployed model (:func:`utils.deployed.parse_preprocessing` text). ``transform``: a
    gallery transform file (``tools/transform``) applied to every old embedding, so the cross-test
    becomes new queries against the transformed old gallery (``"test": "transform"``). Models run in
    fp32 as published; ``amp`` embeds in AMP fp16 on CUDA.
    """
    require((model_file is None) != (restore_embs is None),
            "give a model (-m) or saved embeddings (--restore_embs), exactly one of them")
    require(not (restore_embs and model_file_old),
            "--restore_embs holds the old-model embeddings itself (embs_old); do not pass -m_old")
    require(save_result is None or str(save_result).endswith(".npz"),
            f"-R/--save_result must be a path ending in .npz, got {save_result}")
    require(not save_embeddings or save_result, "-E/--save_embeddings needs -R/--save_result PATH.npz")
    require(resamples >= 0, f"--bootstrap must be 0 (off) or a number of resamples, got {resamples}")
    require(not transform or model_file_old or restore_embs,
            "--transform maps the old model's gallery: give the old model (-m_old) or saved embeddings with embs_old")
    preprocessings = [parse_preprocessing(text, IJB_PREPROCESSING, option, allow_flip=False) if text else None
                      for text, option in ((preprocess, "--preprocess"), (old_preprocess, "--old_preprocess"))]
    meta = load_meta(data_path, subset, one_to_n, force_reload)
    cache = None
    if restore_embs:
        new, old = _restore(restore_embs, len(meta), same_sizes=not transform)
    else:
        options = dict(width=width, input_size=input_size, device=device, batch_size=batch_size,
                       old_width=width if old_width is None else old_width,
                       old_input_size=input_size if old_input_size is None else old_input_size,
                       num_workers=min(8, os.cpu_count() or 1) if num_workers is None else num_workers,
                       cache_dir=cache_dir, chunk_size=chunk_size, preprocess=preprocessings[0],
                       dist_timeout_minutes=dist_timeout_minutes,
                       old_preprocess=preprocessings[1], transform=transform, amp=amp)
        new, old, cache = _embed(meta, model_file, network, model_file_old, network_old, options, local_rank)
        if new is None:   # a rank other than 0 under torchrun: its share of the images is embedded
            return None
    if transform:
        require(old is not None, f"--transform: {restore_embs} holds no old-model embeddings (embs_old)")
        old = apply_transform(transform, old, new[0].shape[1])
    test = "transform" if transform else "cross" if old is not None else "self"
    protocol = "1:N" if one_to_n else "1:1"
    variants = metrics.VARIANTS if bunch else (metrics.DEFAULT_VARIANT,)
    templates = metrics.Templates(meta.templates, meta.medias)
    run = _identification if one_to_n else _verification
    summaries, curves, arrays, found = run(meta, templates, new, old, variants)
    reps = replicate_figures(meta, found, data_path, resamples, bootstrap_seed) if resamples else None
    ci = bootstrap.percentile_intervals(reps) if resamples else None

    result = {"protocol": protocol, "subset": subset, "test": test, **summaries[metrics.DEFAULT_VARIANT],
              "variant": metrics.DEFAULT_VARIANT, "model": model_file or restore_embs,
              "network": network if model_file else None,
              "model_old": model_file_old if old is not None and not restore_embs else None,
              "network_old": network_old if old is not None else None, "transform": transform,
              "data": meta.root, "num_images": len(meta), "num_templates": len(templates.ids)}
    if not one_to_n:
        result["num_pairs"] = int(len(meta.pairs["labels"]))
        result["num_impostor_pairs"] = int((np.asarray(meta.pairs["labels"]) == 0).sum())
    if bunch:
        result["variants"] = summaries
    if ci is not None:
        result["CI95"] = ci
        result["bootstrap"] = {"resamples": int(resamples), "seed": int(bootstrap_seed), "level": 0.95,
                               "unit": "subject (1:1: both templates' subjects; 1:N: probe subjects)"}
    if verbose:
        print(format_table(result), flush=True)

    stem = _output_stem(save_result, subset, model_file or restore_embs, test, protocol)
    if save_result:
        extra = {}
        if reps is not None:   # the resamples' figures, for paired differences between result files
            extra.update(flat_replicates(reps))
        if save_embeddings:
            extra.update(embs=new[0], embs_f=new[1])
            if old is not None:
                extra.update(embs_old=old[0], embs_f_old=old[1])
        atomic_np_savez(save_result, protocol=np.array(protocol), subset=np.array(subset), test=np.array(test),
                        names=np.array(variants), **arrays, **extra)
        with atomic_open(stem + ".json") as handle:
            json.dump(result, handle, indent=1)
        if verbose:
            print(f"saved {save_result} and {stem}.json")
    if plot:
        from tools.ijbc_eval import plots  # matplotlib is loaded only when a figure is drawn

        label = f"{test}-test"
        if one_to_n:
            figure = plots.plot_dir([(f"{label} {v}", metrics.CURVE_FPIR, curves[v]["mean"]) for v in variants],
                                    stem + "_dir.png", title=f"{subset} 1:N {label}")
        else:
            figure = plots.plot_roc([(f"{label} {v}", *curves[v]) for v in variants], stem + "_roc.png",
                                    title=f"{subset} 1:1 {label}")
        if verbose:
            print(f"figure: {figure}")
    if cache is not None:
        cache.clear()
    return result


def plot_only(files, save_result=None):
    """Draw the curves of saved ``-R`` results together; returns the written PNG paths."""
    from tools.ijbc_eval import plots

    roc_curves, dir_curves = [], []
    for path in files:
        with _open_npz(path) as data:
            require("protocol" in data.files and "names" in data.files,
                    f"{path}: not a result saved with -R")
            stem = os.path.splitext(os.path.basename(path))[0]
            names = [str(n) for n in _array(data, "names", path)]
            one_to_one = str(_array(data, "protocol", path)) == "1:1"
            keys = ("labels", "scores") if one_to_one else ("fpir", "tpir")
            require(all(k in data.files for k in keys), f"{path}: a {'1:1' if one_to_one else '1:N'} result "
                                                        f"needs arrays {', '.join(keys)}")
            first, second = (_array(data, k, path) for k in keys)
            for i, name in enumerate(names):
                label = stem if len(names) == 1 else f"{stem} {name}"
                if one_to_one:
                    roc_curves.append((label, *metrics.roc(first, second[i])))
                else:
                    dir_curves.append((label, first, second[i]))
    base = save_result[:-len(".npz")] if save_result else os.path.join(RESULTS_DIR, "compare")
    written = []
    if roc_curves:
        written.append(plots.plot_roc(roc_curves, base + "_roc.png"))
    if dir_curves:
        written.append(plots.plot_dir(dir_curves, base + "_dir.png"))
    return written


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model_file", "--model", dest="model_file",
                   help="new model: backbone state_dict (.pt), ONNX file (.onnx) or TorchScript export")
    p.add_argument("-net", "--network", default="r50", help="backbone of -m (default r50)")
    p.add_argument("-m_old", "--model_file_old", help="old model (cross-test: gallery side)")
    p.add_argument("-old_net", "--network_old", default="r18", help="backbone of -m_old (default r18)")
    p.add_argument("-d", "--data_path", default=DEFAULT_DATA,
                   help="folder holding IJBC/ or IJBB/ (default dataset/IJB_release; the demo's: dataset/synthetic)")
    p.add_argument("-s", "--subset", default="IJBC", help="IJBC or IJBB")
    p.add_argument("-b", "--batch_size", type=int, default=128)
    p.add_argument("-N", "--is_one_2_N", action="store_true", help="1:N identification (default 1:1)")
    p.add_argument("-B", "--is_bunch", action="store_true", help="all eight N/D/F variants")
    p.add_argument("-E", "--save_embeddings", action="store_true", help="store embeddings in the -R file")
    p.add_argument("--restore_embs", metavar="PATH", help="evaluate embeddings saved with -E -R")
    p.add_argument("-R", "--save_result", metavar="PATH.npz", help="write PATH.npz and PATH.json")
    p.add_argument("-P", "--plot_only", nargs="+", metavar="FILE", help="replot saved -R results together")
    p.add_argument("-F", "--force_reload", action="store_true", help="re-parse the meta files")
    p.add_argument("--width", type=int, default=64, help="backbone width of -m")
    p.add_argument("--input_size", type=int, default=112, help="input size of -m")
    p.add_argument("--old_width", type=int, default=None, help="backbone width of -m_old (default --width)")
    p.add_argument("--old_input_size", type=int, default=None, help="input size of -m_old (default --input_size)")
    p.add_argument("--num_workers", type=int, default=None, help="image loading workers (default min(8, CPUs))")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="embed in AMP fp16 on CUDA (faster; default fp32 as published)")
    p.add_argument("--cache_dir", default=None, help="where finished chunks of embeddings are kept so a rerun "
                                                     "resumes (default: $BCT_CACHE_DIR or work_dirs/cache)")
    p.add_argument("--chunk_size", type=int, default=CHUNK_IMAGES,
                   help=f"images per saved chunk (default {CHUNK_IMAGES})")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="95 %% intervals from N subject resamples (JSON 'CI95', ± column in the table)")
    p.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the resamples (default 0)")
    p.add_argument("--preprocess", metavar="SPEC",
                   help="input of -m: mean=V[/V/V],std=V[/V/V] (or scale=V),rgb|bgr (default mean=127.5,"
                        "scale=0.0078125,rgb; docs/features.md)")
    p.add_argument("--old_preprocess", metavar="SPEC", help="the same for -m_old")
    p.add_argument("--transform", metavar="H.pt",
                   help="gallery transform (tools/transform) applied to the old embeddings: new queries vs the "
                        "transformed old gallery")
    return add_launcher_args(p)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.plot_only:
        for path in plot_only(args.plot_only, args.save_result):
            print(f"figure: {path}")
        return None
    return evaluate(args.model_file, args.network, args.data_path, args.is_one_2_N, args.model_file_old,
                    args.network_old, args.subset, args.batch_size, args.is_bunch, args.save_embeddings,
                    args.restore_embs, args.save_result, args.force_reload, args.width, args.input_size,
                    args.old_width, args.old_input_size, args.num_workers, args.device,
                    cache_dir=args.cache_dir, chunk_size=args.chunk_size, local_rank=args.local_rank,
                    resamples=args.bootstrap, bootstrap_seed=args.bootstrap_seed, preprocess=args.preprocess,
                    old_preprocess=args.old_preprocess, transform=args.transform, amp=args.amp,
                    dist_timeout_minutes=args.dist_timeout_minutes)


if __name__ == "__main__":
    run_cli(main)
