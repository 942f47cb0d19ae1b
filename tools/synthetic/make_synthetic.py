"""Synthetic face datasets in the real formats: MS1M-style RecordIO training set, IJB-C-style test set.

    python tools/synthetic/make_synthetic.py --out DIR [--identities 1000] [--images-per-identity 30]
        [--ijb-identities 200] [--ijb-max-frames 5] [--seed 0] [--workers W] [--folder] [--overwrite]

Writes ``DIR/train.rec``, ``DIR/train.idx``, ``DIR/property`` (112×112 aligned JPEG faces, labels
0..N−1 by identity, insightface record-0 header and identity-range records) and ``DIR/IJBC/``
(``meta/`` protocol files and ``loose_crop/`` unaligned photos with their 5 landmarks), see
docs/synthetic.md. ``--folder`` also writes the training crops as an image folder
``DIR/faces/person<label>/<index>.jpg`` (the same JPEG bytes; what tools/pack_rec.py and
``compat_eval.py --data`` read). The output is built in a temporary folder beside ``DIR`` and renamed into place.
Identical bytes for the same options, whatever ``--workers``.
"""
import argparse
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np
from tqdm import tqdm

from tools.synthetic import faces
from utils.errors import UserError, require, run_cli
from utils.recordio import IRHeader, MXIndexedRecordIO, encode_image, pack

CHUNK = 8                     # identities per work unit (fixed, so the output does not depend on --workers)
BATCH = 16                    # images rendered together
IMPOSTORS_PER_GENUINE = 100   # 1:1 impostor pairs kept per genuine pair (all of them when fewer exist)
STREAM_TRAIN, STREAM_IJB, STREAM_IJB_LAYOUT = 0, 1, 2
CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"
# glibc malloc settings for the workers (mallopt(3)): rendering allocates many large temporaries,
# which by default are fresh memory-mapped pages each time; keeping them on the heap halves the time.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 29), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# work units (run in worker processes)
# ---------------------------------------------------------------------------------------------
def render_train_chunk(task):
    """JPEG bytes of the aligned images of ``n_ids`` identities, ``per_id`` each, identity-major."""
    seed, chunk, n_ids, per_id = task
    rng = np.random.default_rng([seed, STREAM_TRAIN, chunk])
    ident = faces.sample_identities(rng, n_ids)
    owner = np.repeat(np.arange(n_ids), per_id)
    view = faces.sample_views(rng, len(owner))
    out = []
    for start in range(0, len(owner), BATCH):
        part = slice(start, start + BATCH)
        images, _ = faces.render_aligned(faces.take(ident, owner[part]), faces.take(view, part), rng)
        out.extend(encode_image(image) for image in images)
    return out


def detector_scores(view, rng):
    """Detector confidence in (0.5, 1]: lower for blurred, occluded, turned or noisy faces."""
    difficulty = np.clip(0.35 * view["blur"] / 2 + 0.3 * view["occluder"].max(1)
                         + 0.2 * np.abs(view["yaw"]) / 0.7 + 0.15 * view["noise"] / 10, 0, 1)
    return (1 - 0.49 * difficulty * rng.uniform(0.5, 1, len(difficulty))).astype(np.float32)


def render_ijb_chunk(task):
    """Unaligned photos of ``n_subjects`` subjects: one per frame of each media.

    ``media_subject`` gives each media's subject (chunk-local), ``media_frames`` its frame count
    (1 = still photo). Returns JPEG bytes, listed landmarks (n×5×2, with detector noise),
    detector scores (n) and face boxes (n×4), frames in media order.
    """
    seed, chunk, n_subjects, media_subject, media_frames = task
    rng = np.random.default_rng([seed, STREAM_IJB, chunk])
    ident = faces.sample_identities(rng, n_subjects)
    media_view = faces.sample_views(rng, len(media_subject))
    media_sizes, media_transform = faces.loose_layout(media_view, rng)
    media = np.repeat(np.arange(len(media_subject)), media_frames)
    n = len(media)
    view = faces.perturb_views(faces.take(media_view, media), rng)
    sizes = media_sizes[media]
    drift = faces.similarity(rng.normal(0, 0.03, n), 1 + rng.normal(0, 0.02, n), rng.normal(0, 2, (n, 2)),
                             sizes / 2)
    transform = faces.compose(drift, media_transform[media])
    ident = faces.take(ident, media_subject[media])
    images, landmarks = faces.render_loose(ident, view, sizes, transform, rng, batch=BATCH)
    listed = landmarks + rng.normal(0, 0.5, landmarks.shape).astype(np.float32)
    scores = detector_scores(view, rng)
    boxes = faces.face_boxes(ident, view, transform)
    jpegs = [encode_image(image, quality=int(q)) for image, q in zip(images, view["quality"])]
    return jpegs, listed, scores, boxes


# ---------------------------------------------------------------------------------------------
# IJB-C protocol layout
# ---------------------------------------------------------------------------------------------
def ijb_layout(rng, m, max_frames=5):
    """Templates, media and frames of ``m`` subjects (dict of arrays, subject-major order).

    Each subject has one gallery template (still photos only) and 2–4 probe templates; a template
    has 1–3 media; a probe media is a video of 2–``max_frames`` frames with probability 0.4. Template and media
    ids are shuffled integers; subjects are split in half between galleries G1 and G2.
    """
    n_probe = rng.choice([2, 3, 4], size=m, p=[0.3, 0.4, 0.3])
    template_subject = np.repeat(np.arange(m), 1 + n_probe)
    gallery = np.zeros(len(template_subject), bool)
    gallery[np.concatenate([[0], np.cumsum(1 + n_probe)[:-1]])] = True
    media_count = rng.choice([1, 2, 3], size=len(template_subject), p=[0.4, 0.4, 0.2])
    media_template = np.repeat(np.arange(len(template_subject)), media_count)
    video = ~gallery[media_template] & (rng.random(len(media_template)) < 0.4)
    in_g1 = np.zeros(m, bool)
    in_g1[rng.permutation(m)[:math.ceil(m / 2)]] = True
    return dict(template_subject=template_subject, gallery=gallery,
                template_id=rng.permutation(len(template_subject)) + 1,
                media_template=media_template, media_id=rng.permutation(len(media_template)) + 1,
                media_frames=np.where(video, rng.integers(2, max_frames + 1, len(media_template)), 1),
                in_g1=in_g1)


def ijb_pairs(layout, rng):
    """1:1 pairs (template1 = gallery, template2 = probe, label) sorted by template ids (n×3 int)."""
    subject, tid = layout["template_subject"], layout["template_id"]
    gal, probe = np.flatnonzero(layout["gallery"]), np.flatnonzero(~layout["gallery"])
    gallery_of = np.empty(subject.max() + 1, np.int64)
    gallery_of[subject[gal]] = gal
    genuine = np.stack([gallery_of[subject[probe]], probe], 1)
    flat = np.flatnonzero(subject[gal][:, None] != subject[probe][None, :])
    cap = IMPOSTORS_PER_GENUINE * len(genuine)
    if len(flat) > cap:
        flat = np.sort(rng.choice(flat, cap, replace=False))
    impostor = np.stack([gal[flat // len(probe)], probe[flat % len(probe)]], 1)
    pairs = np.concatenate([np.c_[tid[genuine], np.ones(len(genuine), np.int64)],
                            np.c_[tid[impostor], np.zeros(len(impostor), np.int64)]])
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _write_lines(path, lines):
    with open(path, "w") as handle:
        handle.write("".join(line + "\n" for line in lines))


def write_ijb(folder, layout, jpegs, listed, scores, boxes, rng):
    """Write ``IJBC/loose_crop`` and ``IJBC/meta`` (images in render order: subject, template, media, frame)."""
    media = np.repeat(np.arange(len(layout["media_template"])), layout["media_frames"])
    template = layout["media_template"][media]
    tid, mid = layout["template_id"][template], layout["media_id"][media]
    subject = layout["template_subject"][template]
    number = np.empty(len(media), np.int64)
    number[np.lexsort((np.arange(len(media)), tid))] = np.arange(1, len(media) + 1)
    order = np.argsort(number)
    names = [f"{k}.jpg" for k in number.tolist()]

    crops, meta = os.path.join(folder, "loose_crop"), os.path.join(folder, "meta")
    os.makedirs(crops)
    os.makedirs(meta)
    for name, jpeg in zip(names, jpegs):
        with open(os.path.join(crops, name), "wb") as handle:
            handle.write(jpeg)
    _write_lines(os.path.join(meta, "ijbc_face_tid_mid.txt"),
                 [f"{names[i]} {tid[i]} {mid[i]}" for i in order.tolist()])
    points = listed.reshape(len(listed), 10)
    _write_lines(os.path.join(meta, "ijbc_name_5pts_score.txt"),
                 [names[i] + "".join(f" {p:.3f}" for p in points[i].tolist()) + f" {scores[i]:.3f}"
                  for i in order.tolist()])
    pairs = ijb_pairs(layout, rng)
    _write_lines(os.path.join(meta, "ijbc_template_pair_label.txt"), [f"{a} {b} {c}" for a, b, c in pairs.tolist()])

    still = layout["media_frames"][media] == 1
    files = [f"img/{k}.jpg" if s else f"frames/{k}.png" for k, s in zip(number.tolist(), still.tolist())]
    box = np.rint(boxes).astype(np.int64)
    rows = [f"{tid[i]},{subject[i] + 1},{files[i]},{mid[i]},{box[i, 0]},{box[i, 1]},{box[i, 2]},{box[i, 3]}"
            for i in range(len(media))]
    gallery = layout["gallery"][template]
    in_g1 = layout["in_g1"][subject]
    for name, keep in (("ijbc_1N_gallery_G1.csv", gallery & in_g1), ("ijbc_1N_gallery_G2.csv", gallery & ~in_g1),
                       ("ijbc_1N_probe_mixed.csv", ~gallery)):
        _write_lines(os.path.join(meta, name), [CSV_HEADER] + [rows[i] for i in order.tolist() if keep[i]])
    return dict(images=len(media), templates=len(layout["template_id"]), media=len(layout["media_id"]),
                subjects=int(layout["template_subject"].max()) + 1, genuine=int(pairs[:, 2].sum()),
                impostor=int(len(pairs) - pairs[:, 2].sum()))


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _chunks(total):
    return [(c, min(CHUNK, total - start)) for c, start in enumerate(range(0, total, CHUNK))]


def write_train(folder, args, mapper):
    """``train.rec``/``train.idx``/``property``: record 0, the images, then one record per identity."""
    n, k = args.identities, args.images_per_identity
    total = n * k
    tasks = [(args.seed, c, size, k) for c, size in _chunks(n)]
    prefix = os.path.join(folder, "train")
    digits = len(str(n - 1))
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer, \
            tqdm(total=total, unit="img", desc="train", dynamic_ncols=True) as bar:
        writer.write_idx(0, pack(IRHeader(2, [total + 1, total + 1 + n], 0, 0), b""))
        key = 1
        for jpegs in mapper(render_train_chunk, tasks):
            for jpeg in jpegs:
                writer.write_idx(key, pack(IRHeader(0, float((key - 1) // k), key, 0), jpeg))
                if args.folder:
                    write_crop(folder, f"person{(key - 1) // k:0{digits}d}", (key - 1) % k, jpeg)
                key += 1
            bar.update(len(jpegs))
        for label in range(n):
            key = total + 1 + label
            writer.write_idx(key, pack(IRHeader(2, [1 + label * k, 1 + (label + 1) * k], key, 0), b""))
    with open(os.path.join(folder, "property"), "w") as handle:
        handle.write(f"{n},112,112\n")
    return total


def write_crop(folder, identity, index, jpeg):
    """``folder/faces/<identity>/<index>.jpg``: one training crop in the image-folder layout."""
    os.makedirs(os.path.join(folder, "faces", identity), exist_ok=True)
    with open(os.path.join(folder, "faces", identity, f"{index:03d}.jpg"), "wb") as handle:
        handle.write(jpeg)


def make_ijb(folder, args, mapper):
    layout = ijb_layout(np.random.default_rng([args.seed, STREAM_IJB_LAYOUT]), args.ijb_identities,
                        args.ijb_max_frames)
    subject_of_media = layout["template_subject"][layout["media_template"]]
    tasks = []
    for c, size in _chunks(args.ijb_identities):
        sel = (subject_of_media >= c * CHUNK) & (subject_of_media < c * CHUNK + size)
        tasks.append((args.seed, c, size, subject_of_media[sel] - c * CHUNK, layout["media_frames"][sel]))
    jpegs, listed, scores, boxes = [], [], [], []
    with tqdm(total=int(layout["media_frames"].sum()), unit="img", desc="IJBC", dynamic_ncols=True) as bar:
        for part in mapper(render_ijb_chunk, tasks):
            jpegs += part[0]
            listed.append(part[1])
            scores.append(part[2])
            boxes.append(part[3])
            bar.update(len(part[0]))
    return write_ijb(os.path.join(folder, "IJBC"), layout, jpegs, np.concatenate(listed), np.concatenate(scores),
                     np.concatenate(boxes), np.random.default_rng([args.seed, STREAM_IJB_LAYOUT, 1]))


def _check_out(out, overwrite):
    if os.path.exists(out):
        require(os.path.isdir(out), f"--out {out}: exists and is not a folder")
        require(overwrite or not os.listdir(out),
                f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")


def _move_into_place(tmp, out):
    if os.path.exists(out):
        old = tmp + ".old"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def start_pool(workers):
    """A pool of ``workers`` fresh (spawned) processes started with :data:`WORKER_ENV`."""
    saved = {key: os.environ.get(key) for key in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        return multiprocessing.get_context("spawn").Pool(workers)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (train.rec/.idx, property, IJBC/)")
    parser.add_argument("--identities", type=int, default=1000, help="training identities N (≥ 2)")
    parser.add_argument("--images-per-identity", type=int, default=30, help="training images per identity K (≥ 1)")
    parser.add_argument("--ijb-identities", type=int, default=200, help="IJB-C-style subjects M (≥ 2)")
    parser.add_argument("--ijb-max-frames", type=int, default=5,
                        help="longest IJB-C-style video, in frames (≥ 2; videos have 2 to this many)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (≥ 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: CPU count, at most 8; 0 = render in this process)")
    parser.add_argument("--folder", action="store_true",
                        help="also write the training crops as an image folder OUT/faces/person<label>/<index>.jpg")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)
    require(args.identities >= 2, f"--identities must be at least 2, got {args.identities}")
    require(args.images_per_identity >= 1, f"--images-per-identity must be at least 1, got {args.images_per_identity}")
    require(args.ijb_identities >= 2, f"--ijb-identities must be at least 2, got {args.ijb_identities}")
    require(args.ijb_max_frames >= 2, f"--ijb-max-frames must be at least 2, got {args.ijb_max_frames}")
    require(args.seed >= 0, f"--seed must be non-negative, got {args.seed}")
    if args.workers is None:
        args.workers = min(os.cpu_count() or 1, 8)
    require(args.workers >= 0, f"--workers must be non-negative, got {args.workers}")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    _check_out(out, args.overwrite)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=parent)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write to {parent}: {exc.strerror}") from None
    start = time.time()
    pool = start_pool(args.workers) if args.workers > 0 else None
    mapper = pool.imap if pool is not None else map
    try:
        n_train = write_train(tmp, args, mapper)
        train_seconds = time.time() - start
        ijb = make_ijb(tmp, args, mapper)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.time() - start
    print(f"training set: {args.identities} identities × {args.images_per_identity} = {n_train} images "
          f"in {train_seconds:.1f} s ({n_train / max(train_seconds, 1e-9):.0f} images/s) → {out}/train.rec"
          + (f" and {out}/faces/" if args.folder else ""))
    print(f"IJBC: {ijb['subjects']} subjects, {ijb['templates']} templates, {ijb['media']} media, "
          f"{ijb['images']} images, {ijb['genuine']} genuine / {ijb['impostor']} impostor pairs → {out}/IJBC")
    print(f"done in {seconds:.1f} s (seed {args.seed}, {args.workers} workers)")


if __name__ == "__main__":
    run_cli(main)
