"""Is my new model compatible with my deployed one? A compatibility matrix on your own face crops.

    python tools/compat_eval/compat_eval.py --data ROOT --models v1.pt v2.pt v3.pt --networks r18 r50 r50 -R out/compat
    python tools/compat_eval/compat_eval.py --rec PREFIX --models v1.pt v2.onnx -R out/compat -E
    python tools/compat_eval/compat_eval.py --restore_embs out/compat.npz -R out/compat2

Data: aligned crops as ``ROOT/<identity>/<image>`` (jpg/jpeg/png/bmp) or a RecordIO set (``PREFIX.rec/.idx``).
Models: generations oldest first. Every image is embedded once per model; for every ordered pair
(query generation, gallery generation) the tool reports 1:1 TAR@FAR and AUC, 1:N top-k and
TPIR@FPIR, with bootstrap 95 % intervals over identities, the matrix of the main metric and a
verdict per later generation (with 3+ generations also Average Compatibility and Average
Multi-model accuracy); ``--backfill`` adds the curves of a gallery re-extracted bit by bit
(:mod:`tools.compat_eval.backfill`). Writes ``PATH.json``, ``PATH.md``, ``PATH.png`` (and
``PATH_backfill.png`` with ``--backfill``, ``PATH.npz`` with ``-E``). Under torchrun the images are
shared among the processes; an interrupted embedding resumes from its saved chunks. See docs/compat.md.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np

from tools.compat_eval import backfill
from tools.compat_eval.data import FaceSet, TimedRunner, build_embedders, embed, image_features, restore
from tools.compat_eval.protocol import METRICS, Protocol, check_sizes, compatibility
from tools.compat_eval.report import decision_of, format_report, plot_matrix
from tools.ijbc_eval import CHUNK_IMAGES, bootstrap
from utils.chunk_cache import ChunkCache
from utils.distributed import launched
from utils.errors import ArgumentParser, UserError, require, run_cli
from utils.io import atomic_np_savez, atomic_open

TIMED_ROWS = 1 << 14     # features at least in the timing of the transform (the demo's figure: as many)


def _per_model(values, count, option, cast):
    """One value per model from ``values`` (one per model, or one for all)."""
    require(len(values) in (1, count), f"{option}: give one value per model ({count}) or one for all, "
                                       f"got {len(values)}")
    try:
        return [cast(v) for v in (values * count if len(values) == 1 else values)]
    except ValueError:
        raise UserError(f"{option}: expected {cast.__name__} values, got {' '.join(map(str, values))}") from None


def preprocessings(texts, count):
    """Each generation's :class:`utils.deployed.Preprocessing` from ``--preprocess`` (one per model, or one)."""
    from utils.deployed import IJB_PREPROCESSING, parse_preprocessing

    return [parse_preprocessing(t, IJB_PREPROCESSING) for t in _per_model(texts or [""], count, "--preprocess", str)]


def load_transform(path):
    """``(model, saved dict)`` of the ``--transform`` file (refused in one line when it is not a transform)."""
    from tools.transform.transforms import load

    return load(path)


def check_transform_size(path, saved, size):
    """The transform must map ``size``-d embeddings to ``size``-d ones (every generation makes one size)."""
    require(saved["in_dim"] == size == saved["out_dim"],
            f"--transform {path} maps {saved['in_dim']}-d embeddings to {saved['out_dim']}-d ones, but the "
            f"generations make {size}-d embeddings (compat_eval needs one size; ijbc_eval.py --transform "
            "evaluates a transform between two sizes)")


def choices(args, names, identity_names):
    """``(backfill pair, backfill file order, transform pair)`` from the options that name generations or
    identities, checked before any image is embedded."""
    pair = backfill.check_pair(names, args.backfill) if args.backfill is not None else None
    file_order = backfill.read_order(args.backfill_order, identity_names, args.seed) if args.backfill_order else None
    transform_pair = None
    if args.transform:
        transform_pair = tuple(_generation(names, g) for g in args.transform_generations or (names[0], names[-1]))
        require(transform_pair[0] != transform_pair[1],
                f"--transform_generations: give two different generations, got {names[transform_pair[0]]} twice")
    return pair, file_order, transform_pair


def transformed_gallery(names, embeddings, flips, transform, old, new):
    """``((name, image features, old index, new index), seconds per million features)``: generation ``old``'s
    embeddings (and mirrored ones) mapped by the ``--transform`` ``(model, saved dict)``, the mapping timed
    (on :data:`TIMED_ROWS` of its rows repeated when it maps fewer: there per-call overheads would dominate)."""
    from tools.transform.transforms import transform_rows

    model, saved = transform
    start = time.perf_counter()
    mapped = [transform_rows(model, part) for part in embeddings[old]]
    elapsed, rows = time.perf_counter() - start, sum(len(part) for part in mapped)
    if rows < TIMED_ROWS:
        repeated = np.resize(embeddings[old][0], (TIMED_ROWS, embeddings[old][0].shape[1]))
        start = time.perf_counter()
        transform_rows(model, repeated)
        elapsed, rows = time.perf_counter() - start, TIMED_ROWS
    return (f"{names[old]} + {saved['kind']}", image_features(*mapped, flips[old]), old, new), elapsed / rows * 1e6


def backfill_orders(args, protocol, num_identities, old_embeddings, new, gallery, labels, file_order, far):
    """The re-extraction orders of a backfill: random, norm (of the old model's raw embeddings), the
    oracle (of the gallery items not yet re-extracted) and ``--backfill_order``'s file order."""
    orders = {"random": backfill.random_order(num_identities, args.seed),
              "norm": backfill.norm_order(old_embeddings[0] + old_embeddings[1], labels, protocol.gallery_images),
              "oracle": backfill.oracle_order(protocol, gallery, new, far, args.seed)}
    if file_order is not None:
        orders["file"] = file_order
    return orders


def _generation(names, text, option="--transform_generations"):
    """Index of a generation given by name or 1-based position."""
    if text in names:
        return names.index(text)
    require(text.isdigit() and 1 <= int(text) <= len(names),
            f"{option}: {text} is neither a generation name ({', '.join(names)}) nor a position 1..{len(names)}")
    return int(text) - 1


def independent_generation(names, text):
    """The name of the ``--independent`` generation (None when not given)."""
    return None if text is None else names[_generation(names, text, "--independent")]


def _default_names(models):
    stems = [os.path.splitext(os.path.basename(m))[0] for m in models]
    return stems if len(set(stems)) == len(stems) else [f"gen{i + 1}" for i in range(len(models))]


def _embed(args, faceset, networks, widths, sizes, transform):
    """``([(embs, embs_f), …] per model, the chunk cache, seconds per million images of each model)``; under
    torchrun the images are shared among the ranks and ranks other than 0 get ``(None, cache, …)``.
    ``transform``: the saved ``--transform`` dict (or None), checked against the models' embedding size before
    the images are embedded. The seconds are the models' forward passes on this process's images (None
    when every chunk came from the cache)."""
    with launched(device=args.device) as dist_info:
        device = dist_info.device if dist_info else args.device
        embedders = build_embedders(args.models, networks, widths, sizes, device,
                                    preprocessings(args.preprocess, len(args.models)))
        check_sizes(args.models, [e.embedding_size for e in embedders])
        if transform is not None:
            check_transform_size(args.transform, transform, embedders[0].embedding_size)
        inputs = dict(faces=faceset.describe(), models=[e.describe() for e in embedders])
        cache = ChunkCache("compat_embed", inputs, len(faceset), CHUNK_IMAGES)
        workers = min(4, os.cpu_count() or 1) if args.num_workers is None else args.num_workers
        timed = [TimedRunner(e) for e in embedders]
        return embed(faceset, timed, args.batch_size, workers, cache, dist_info), cache, \
            [t.seconds_per_million() for t in timed]


def run(args):
    """The command: data → embeddings → protocol → matrix; returns the result dict."""
    require((args.data is None) != (args.rec is None) or args.restore_embs,
            "give the faces as --data ROOT or --rec PREFIX (exactly one), or --restore_embs PATH.npz")
    require(not (args.data and args.rec), "give --data or --rec, not both")
    require(bool(args.models) != bool(args.restore_embs), "give --models (oldest first) or --restore_embs, not both")
    require(not args.save_embeddings or not args.restore_embs, "-E saves embeddings made from --models")
    require(args.bootstrap >= 0, f"--bootstrap must be >= 0, got {args.bootstrap}")
    require(args.impostors >= 1 and (args.max_genuine is None or args.max_genuine >= 1) and args.gallery_per_id >= 1,
            "--impostors, --max_genuine and --gallery_per_id must be >= 1")
    require(0 <= args.nonmated_share < 1, f"--nonmated_share must lie in [0, 1), got {args.nonmated_share}")
    require(args.backfill is not None or not args.backfill_order, "--backfill_order needs --backfill")
    require(args.metric in METRICS, f"--metric {args.metric}: expected one of {', '.join(METRICS)}")
    transform = load_transform(args.transform) if args.transform else None
    stem = args.save_result[:-len(".json")] if args.save_result.endswith(".json") else args.save_result
    if args.models:
        count = len(args.models)
        networks = _per_model(args.networks, count, "--networks", str)
        widths = _per_model(args.widths, count, "--widths", int)
        sizes = _per_model(args.input_sizes, count, "--input_sizes", int)
        names = args.names or _default_names(args.models)
        require(len(names) == count and len(set(names)) == count,
                f"--names: give {count} distinct names, got {' '.join(names)}")
        faceset = FaceSet(args.data, args.rec, args.image_size, args.resize, sorted(set(sizes)))
        pair, file_order, transform_pair = choices(args, names, faceset.identities)
        independent = independent_generation(names, args.independent)
        embeddings, cache, embedding_rates = _embed(args, faceset, networks, widths, sizes,
                                                    None if transform is None else transform[1])
        if embeddings is None:   # a rank other than 0 under torchrun: its share of the images is embedded
            return None
        labels = faceset.labels
    else:
        cache, embedding_rates = None, []
        faceset = FaceSet(args.data, args.rec, args.image_size, args.resize) if args.data or args.rec else None
        names, labels, embeddings = restore(args.restore_embs, faceset)
        if args.names:
            require(len(args.names) == len(names), f"--names: {args.restore_embs} holds {len(names)} generations")
            names = args.names
    identity_names, labels = np.unique(labels, return_inverse=True)
    if faceset is not None:
        identity_names = faceset.identities
    if not args.models:
        pair, file_order, transform_pair = choices(args, names, identity_names)
        independent = independent_generation(names, args.independent)
        if transform is not None:
            check_transform_size(args.transform, transform[1], embeddings[0][0].shape[1])
    flips = [p.flip_sum for p in preprocessings(args.preprocess, len(names))]
    features = [image_features(*e, flip) for e, flip in zip(embeddings, flips)]
    require(all(np.isfinite(f).all() for f in features), "the embeddings contain NaN or inf")
    protocol = Protocol(labels, args.max_genuine, args.impostors, args.gallery_per_id, args.nonmated_share, args.seed)
    curves = len(args.backfill_merge) * (3 + (file_order is not None)) * (1 + bool(transform)) if pair is not None else 0
    print(f"matrix: {len(names) ** 2 + bool(transform)} cells on {len(identity_names)} identities, "
          f"{args.bootstrap} bootstrap resamples" + (f"; then {curves} backfill curves" if curves else ""), flush=True)
    transformed, transform_rate = transformed_gallery(names, embeddings, flips, transform, *transform_pair) \
        if transform else (None, None)
    result = compatibility(features, names, protocol, args.bootstrap, args.seed, args.metric, transformed)
    result["models"] = list(args.models) if args.models else args.restore_embs
    result["transform"] = args.transform
    result["independent"] = independent
    result["cost"] = {"transform_seconds_per_million_features": transform_rate,
                      "reextraction_seconds_per_million_images": {name: rate for name, rate in
                                                                  zip(names, embedding_rates) if rate is not None}}
    if pair is not None:
        counts = bootstrap.subject_counts(len(identity_names), args.bootstrap, args.seed) if args.bootstrap else None
        far = backfill.flip_far(args.metric)
        settings = [(*pair, None, None)] + ([(*transformed[2:], transformed[1], transformed[0])] if transformed else [])
        result["backfill"] = []
        for old, new, gallery, gallery_name in settings:     # backfill; FastFill: the transformed gallery
            orders = backfill_orders(args, protocol, len(identity_names), embeddings[old], features[new],
                                     features[old] if gallery is None else gallery, labels, file_order, far)
            result["backfill"] += backfill.backfill_curves(protocol, features[old], features[new], orders,
                                                           [names[old], names[new]], counts, args.backfill_merge, far,
                                                           args.seed, gallery, gallery_name)
    if args.save_embeddings:
        atomic_np_savez(stem + ".npz", generations=np.array(names), labels=faceset.labels,
                        **{f"embs{i}": e[0] for i, e in enumerate(embeddings)},
                        **{f"embs_f{i}": e[1] for i, e in enumerate(embeddings)})
    result["decision"] = decision_of(result)
    report = format_report(result)
    with atomic_open(stem + ".json") as handle:
        json.dump(result, handle, indent=1)
    with atomic_open(stem + ".md") as handle:
        handle.write(report)
    plot_matrix(result, stem + ".png")
    if pair is not None:
        backfill.plot_backfill(result["backfill"], stem + "_backfill.png", args.metric)
    if cache is not None:
        cache.clear()
    print(report)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png" + (f", {stem}_backfill.png" if pair is not None else "")
          + (f", {stem}.npz" if args.save_embeddings else ""))
    return result


def build_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="ROOT", help="aligned crops as ROOT/<identity>/<image> (.jpg, .jpeg, .png or .bmp)")
    p.add_argument("--rec", metavar="PREFIX", help="RecordIO set PREFIX.rec/.idx (or a folder with train.rec)")
    p.add_argument("--models", nargs="+", default=[], help="model generations, oldest first (.pt state_dict or .onnx)")
    p.add_argument("--networks", nargs="+", default=["r50"], help="backbone per model, or one for all (default r50)")
    p.add_argument("--widths", nargs="+", default=["64"], help="backbone width per model, or one (default 64)")
    p.add_argument("--input_sizes", nargs="+", default=["112"], help="input size per model, or one (default 112)")
    p.add_argument("--names", nargs="+", help="generation names (default: the model file names)")
    p.add_argument("--image_size", type=int, default=112, help="expected crop size (default 112)")
    p.add_argument("--resize", action="store_true", help="resize images of any size instead of refusing them")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sampling, gallery split and bootstrap")
    p.add_argument("--max_genuine", type=int, default=None, help="sample this many genuine pairs (default: all)")
    p.add_argument("--impostors", type=int, default=1_000_000, help="impostor pairs sampled (default 1,000,000)")
    p.add_argument("--gallery_per_id", type=int, default=1, help="images enrolled per gallery identity (default 1)")
    p.add_argument("--nonmated_share", type=float, default=0.1,
                   help="share of identities held out of the gallery as non-mated probes (default 0.1)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of identities (0: no intervals)")
    p.add_argument("--metric", default="TAR@FAR=1e-4", help=f"main metric: one of {', '.join(METRICS)}")
    p.add_argument("--backfill", nargs="*", metavar="GEN",
                   help="backfill curves: OLD NEW generation names (default: the last two); with --transform also "
                        "the FastFill curves of the transformed gallery; docs/compat.md")
    p.add_argument("--backfill_order", metavar="FILE",
                   help="also the order of FILE: one identity name per line, first re-extracted first")
    p.add_argument("--backfill_merge", nargs="+", choices=backfill.MERGES, default=list(backfill.MERGES),
                   help="merges of the two score scales in the mixed gallery (default: both)")
    p.add_argument("-R", "--save_result", default=os.path.join(ROOT, "work_dirs", "compat", "compat"), metavar="PATH",
                   help="write PATH.json, PATH.md, PATH.png (default work_dirs/compat/compat)")
    p.add_argument("-E", "--save_embeddings", action="store_true", help="also write the embeddings to PATH.npz")
    p.add_argument("--restore_embs", metavar="PATH.npz", help="evaluate embeddings saved with -E instead of models")
    p.add_argument("-b", "--batch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=None, help="image loading workers (default min(4, CPUs))")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preprocess", nargs="+", metavar="SPEC",
                   help="input of each model (one per model, or one): mean=V[/V/V],std=V[/V/V] (or scale=V),"
                        "rgb|bgr,flip_sum|no_flip (default mean=127.5,scale=0.0078125,rgb,flip_sum; "
                        "docs/features.md)")
    p.add_argument("--transform", metavar="H.pt", help="gallery transform (tools/transform): adds the cell new "
                                                       "queries vs the transformed old gallery, and its verdict")
    p.add_argument("--transform_generations", nargs=2, metavar=("OLD", "NEW"),
                   help="the generations the transform maps from and to (names or positions; default first, last)")
    p.add_argument("--independent", metavar="GEN",
                   help="a generation trained without compatibility (name or position): the decision states each "
                        "candidate's self-test against it")
    return p


def main(argv=None):
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
