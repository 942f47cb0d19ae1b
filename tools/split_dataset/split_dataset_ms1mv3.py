"""Split an insightface RecordIO training set into the class and data splits of the paper.

    python tools/split_dataset/split_dataset_ms1mv3.py --root DIR [--ratio 0.3] [--out DIR]

Reads ``DIR/train.rec``/``train.idx`` (+ ``DIR/property``) and writes, for ratio 0.3, into ``--out``
(default ``DIR``) the prefixes ``train_part_30_class``, ``train_part_70_class``,
``train_part_30_data`` and ``train_part_70_data``, each as ``<prefix>.rec``, ``<prefix>.idx`` and
``<prefix>.property`` (``num_classes,height,width``):

- class split: the first round(ratio·C) identities (labels 0..) → ``part_30_class``; the others →
  ``part_70_class``, relabelled from 0;
- data split: per identity with n images (dataset order), the first max(1, round(ratio·n)) →
  ``part_30_data``, the rest → ``part_70_data``; identities with one image go to both; labels kept.

``round`` is Python's (half to even). Each output has an insightface record 0 (flag 2, label
``(N+1, N+1)``: images are keys 1..N, no identity records) and keeps the source records' id/id2.
Two streaming passes (record headers, then payloads); everything is written in a staging folder,
verified, then moved into place.
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
from tqdm import tqdm

from utils.dataset import MXFaceDataset, read_property
from utils.errors import UserError, run_cli
from utils.recordio import IRHeader, MXIndexedRecordIO, decode_image, pack, relabel, unpack

FLOAT32_EXACT = 1 << 24  # record 0 stores N+1 as float32


def split_plan(labels, num_classes, ratio):
    """The four splits as ``{suffix: (mask, new_labels, num_classes)}``, e.g. suffix ``30_class``.

    ``mask`` selects dataset positions (dataset order is kept); ``new_labels`` is indexed like
    ``labels``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    small = int(round(ratio * 100))
    first = round(ratio * num_classes)
    in_first = labels < first
    counts = np.bincount(labels, minlength=num_classes)
    order = np.argsort(labels, kind="stable")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - (np.cumsum(counts) - counts)[labels[order]]
    take = np.maximum(1, np.rint(ratio * counts).astype(np.int64))  # rint rounds half to even, as round()
    in_small_data = rank < take[labels]
    in_large_data = ~in_small_data | (counts[labels] == 1)
    return {f"{small}_class": (in_first, labels, first),
            f"{100 - small}_class": (~in_first, labels - first, num_classes - first),
            f"{small}_data": (in_small_data, labels, num_classes),
            f"{100 - small}_data": (in_large_data, labels, num_classes)}


def write_splits(dataset, plan, shape, staging, chunk=65536):
    """Copy the records of every split into ``staging`` (one pass over the source, in dataset order)."""
    suffixes = list(plan)
    writers = []
    try:
        for suffix in suffixes:
            prefix = os.path.join(staging, f"train_part_{suffix}")
            count = int(plan[suffix][0].sum())
            if count + 1 >= FLOAT32_EXACT:
                raise UserError(f"{prefix}: {count} images exceed what the float32 record-0 header can index")
            writers.append(MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w"))
            writers[-1].write_idx(0, pack(IRHeader(2, [count + 1, count + 1], 0, 0), b""))
        member = np.stack([plan[s][0] for s in suffixes], axis=1)
        codes = (member << np.arange(len(suffixes))).sum(axis=1)  # bit t: the image goes to split t
        targets_of = [[t for t in range(len(suffixes)) if code >> t & 1] for code in range(1 << len(suffixes))]
        new_labels = np.stack([plan[s][1] for s in suffixes], axis=1)
        next_key = [1] * len(suffixes)
        with tqdm(total=len(dataset), desc="copying records", unit="img", disable=None) as bar:
            for lo in range(0, len(dataset), chunk):
                part = slice(lo, lo + chunk)
                for key, offset, code, labels in zip(dataset.keys[part].tolist(), dataset.offsets[part].tolist(),
                                                     codes[part].tolist(), new_labels[part].tolist()):
                    payload = dataset.record.read_at(offset, key)
                    for t in targets_of[code]:
                        writers[t].write_idx(next_key[t], relabel(payload, labels[t], f"{dataset.rec_path}: key {key}"))
                        next_key[t] += 1
                bar.update(min(chunk, len(dataset) - lo))
        for suffix, writer in zip(suffixes, writers):
            writer.close()
            with open(os.path.join(staging, f"train_part_{suffix}.property"), "w") as handle:
                handle.write(f"{plan[suffix][2]},{shape[0]},{shape[1]}\n")
    except BaseException as exc:
        for writer in writers:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise


def verify(staging, plan):
    """Re-read every output: image count, labels and class count as planned."""
    for suffix, (mask, labels, classes) in plan.items():
        written = MXFaceDataset(os.path.join(staging, f"train_part_{suffix}"), train=False)
        expected = labels[mask]
        if len(written) != len(expected) or not np.array_equal(written.labels, expected) \
                or written.num_classes != classes:
            raise UserError(f"verification failed for train_part_{suffix}: wrote {len(written)} images / "
                            f"{written.num_classes} classes, expected {len(expected)} / {classes}")
        written.record.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Class and data splits of an insightface RecordIO training set.")
    parser.add_argument("--root", required=True, help="folder with train.rec, train.idx (and property)")
    parser.add_argument("--ratio", type=float, default=0.3, help="share of the small split (default 0.3)")
    parser.add_argument("--out", default=None, help="output folder (default: --root)")
    args = parser.parse_args(argv)
    if not 0 < args.ratio < 1 or round(args.ratio * 100) in (0, 50, 100):
        raise UserError(f"--ratio must be in (0, 1) and round to a percentage from 1 to 99 other than 50 "
                        f"(the two parts need different names), got {args.ratio}")
    if not os.path.isdir(args.root):
        raise UserError(f"--root {args.root} is not a folder (expected one holding train.rec and train.idx)")
    out = os.path.abspath(args.out or args.root)

    source = MXFaceDataset(args.root, train=False)
    num_classes = source.num_classes
    if source.property_path:
        shape = read_property(source.property_path)[1:]
    else:
        shape = decode_image(unpack(source.record.read_idx(int(source.keys[0])))[1]).shape[:2]
    if source.labels.min() < 0 or source.labels.max() >= num_classes:
        raise UserError(f"{source.rec_path}: labels span {source.labels.min()}..{source.labels.max()}, "
                        f"outside the {num_classes} classes of {source.property_path}")
    plan = split_plan(source.labels, num_classes, args.ratio)
    for suffix, (mask, _, classes) in plan.items():
        if not mask.any() or not classes:
            raise UserError(f"--ratio {args.ratio} leaves train_part_{suffix} empty for {len(source)} images "
                            f"of {num_classes} classes")
    print(f"{source.rec_path}: {len(source)} images, {num_classes} classes; ratio {args.ratio}")

    try:
        os.makedirs(out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".tmp-split-", dir=out)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out}: {exc.strerror}") from None
    try:
        write_splits(source, plan, shape, staging)
        verify(staging, plan)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    lines = [f"{'split':<24}{'images':>10}{'identities':>12}{'classes':>9}"]
    for suffix, (mask, labels, classes) in plan.items():
        name = f"train_part_{suffix}"
        lines.append(f"{name:<24}{int(mask.sum()):>10}{len(np.unique(labels[mask])):>12}{classes:>9}")
    print("\n".join(lines))
    print(f"written to {out} (<name>.rec, <name>.idx, <name>.property)")


if __name__ == "__main__":
    run_cli(main)
