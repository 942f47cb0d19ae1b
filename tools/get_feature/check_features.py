"""Check stored old features against the old model, and what a new model makes of them.

    python tools/get_feature/check_features.py configs/f128_r18_softmax_class30.py --SD f128_r18_softmax_class70 \
        [--new_config BCT_methods/L2/configs/X.py] [--images 3000] [-R report.json]

On a seeded sample of the split's images (the rows the training loader reads):

- ``stored vs recomputed``: cosine between each stored old feature and the old model's embedding of
  the same row, recomputed now. About 1 when files, order and input scaling agree; a shuffled or
  stale feature file shows up as a low value.
- ``old flip``: cosine between the old model's embeddings of an image and of its mirror image.
  Training flips half of the images while the stored features come from unflipped ones, so
  ``‖n̂(o(x)) − n̂(o(flip x))‖`` is what a flipped sample's target is off by.
- with ``--new_config``: the new model's distance ``‖n̂(f(x)) − n̂(o(x))‖`` to the stored features,
  separately on unflipped and on flipped images, and the new model's own flip cosine.
- for scale: the old model's mean cosine between two images of one identity, and of two identities.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np

from utils.config import add_config_args, get_config
from utils.errors import require, run_cli
from utils.io import atomic_open
from utils.old_features import add_sd_args, load_features, sd_rec
from utils.scenarios import feature_path, parse_sd


def unit_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_both(cfg, rec, rows, num_rows, batch_size=256):
    """L2-normalised embeddings of ``rows`` of ``rec`` (checked to hold ``num_rows`` images) and of their
    mirror images by ``cfg``'s model, and the rows' labels."""
    import torch

    from backbones import load_backbone
    from utils.dataset import MXFaceDataset
    from utils.embedding import ModelRunner

    model_file = os.path.join(cfg.output, "model.pt")
    require(os.path.isfile(model_file), f"model not found: {model_file} (train {cfg.config_path} first)")
    model = load_backbone(model_file, cfg.network, cfg.network_width, cfg.input_size)
    dataset = MXFaceDataset(rec, train=False, input_size=cfg.input_size, uint8=True)
    require(len(dataset) == num_rows, f"{dataset.rec_path} holds {len(dataset)} images but the feature file "
                                      f"has {num_rows} rows")
    runner = ModelRunner(model, "cpu", flip=True)
    plain, mirror = [], []
    with torch.no_grad():
        for lo in range(0, len(rows), batch_size):
            a, b = runner(dataset.get_batch(rows[lo:lo + batch_size])[0])
            plain.append(a)
            mirror.append(b)
    return unit_rows(np.concatenate(plain)), unit_rows(np.concatenate(mirror)), dataset.labels[rows]


def check(old_cfg, sd, new_cfg=None, images=3000, output=None, seed=0):
    """The report (a dict of mean figures) for ``images`` rows drawn with ``seed``."""
    parse_sd(sd)
    stored, stored_labels = load_features(sd, output)
    features = feature_path(sd, "feature", output)
    rec = sd_rec(old_cfg.rec, sd)
    rows = np.sort(np.random.default_rng(seed).choice(len(stored), min(images, len(stored)), replace=False))
    old, old_mirror, labels = embed_both(old_cfg, rec, rows, len(stored))
    require(np.array_equal(labels, stored_labels[rows]), f"{features}: its labels differ from {rec}'s in the same "
                                                         "rows (another split, or another order)")
    target = unit_rows(np.asarray(stored[rows], np.float32))
    same = labels[:, None] == labels[None]
    np.fill_diagonal(same, False)
    similarity = old @ old.T
    report = {"features": features, "rec": rec, "images": int(len(rows)), "seed": seed,
              "stored_vs_recomputed_cos": float((old * target).sum(1).mean()),
              "old_flip_cos": float((old * old_mirror).sum(1).mean()),
              "old_flip_distance": float(np.linalg.norm(old - old_mirror, axis=1).mean()),
              "old_same_identity_cos": float(similarity[same].mean()) if same.any() else float("nan"),
              "old_other_identity_cos": float(similarity[labels[:, None] != labels[None]].mean())}
    if new_cfg is not None:
        new, new_mirror, _ = embed_both(new_cfg, rec, rows, len(stored))
        report.update(new_model=os.path.join(new_cfg.output, "model.pt"),
                      new_distance_unflipped=float(np.linalg.norm(new - target, axis=1).mean()),
                      new_distance_flipped=float(np.linalg.norm(new_mirror - target, axis=1).mean()),
                      new_flip_cos=float((new * new_mirror).sum(1).mean()))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config of the old model (work_dirs/<name>/model.pt)")
    add_sd_args(parser)
    parser.add_argument("--new_config", default=None, help="a new model's training config (its output/model.pt)")
    parser.add_argument("--images", type=int, default=3000, help="rows of the split to sample (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("-R", "--report", default=None, help="also write the report as JSON to this path")
    add_config_args(parser, positional=False)
    args = parser.parse_args(argv)
    require(args.images >= 2, f"--images must be at least 2, got {args.images}")
    new_cfg = get_config(args.new_config) if args.new_config else None
    report = check(get_config(args.config, args.overrides), args.SD, new_cfg, args.images, args.output, args.seed)
    for key, value in report.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.report:
        with atomic_open(args.report) as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    run_cli(main)
