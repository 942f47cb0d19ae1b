"""Step 3: class prototypes → ``<SD>_avg_feature.npy`` (C×d float32, row c = class c).

    python tools/get_feature/get_avg_feature.py --SD f128_r18_softmax_class70
    python tools/get_feature/get_avg_feature.py configs/f128_r18_softmax_class30.py --SD f128_r18_softmax_class70

Prototype of class c = the mean of its raw old embeddings, then L2-normalised (as published), for
every class 0..C−1 (C = max label + 1, or ``--num_classes``); a class without images is an error.
With a config, the features are first extracted as ``get_feature.py`` does when the feature files
do not exist yet (that part runs under torchrun too; the averaging runs on rank 0).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from utils.config import add_config_args, get_config
from utils.errors import UserError, about_file, run_cli
from utils.feature_stats import class_prototypes
from tools.get_feature.extract import add_extract_args, extract_from_args
from utils.old_features import add_sd_args, load_features
from utils.scenarios import feature_path, parse_sd
from utils.io import atomic_np_save


def main(argv=None):
    parser = argparse.ArgumentParser(description="Average old features per class (L2-normalised prototypes).")
    parser.add_argument("config", nargs="?", help="old-model config: extract the features first if missing")
    add_extract_args(add_sd_args(parser))
    parser.add_argument("--num_classes", type=int, default=None, help="number of classes (default: max label + 1)")
    add_config_args(parser, positional=False)
    args = parser.parse_args(argv)
    parse_sd(args.SD)
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num_classes must be >= 1, got {args.num_classes}")
    sources = [feature_path(args.SD, kind, args.output) for kind in ("feature", "label")]
    if (args.config or args.model) and not all(os.path.isfile(p) for p in sources):
        cfg = get_config(args.config, args.overrides) if args.config else None
        if not extract_from_args(cfg, args):
            return
    elif int(os.environ.get("RANK", "0")) != 0:
        return
    features, labels = load_features(args.SD, args.output)
    with about_file(sources[0]):
        prototypes = class_prototypes(features, labels, args.num_classes)
    out = feature_path(args.SD, "avg_feature", args.output)
    atomic_np_save(out, prototypes)
    print(f"saved {out}: {prototypes.shape[0]} class prototypes of dimension {prototypes.shape[1]}")


if __name__ == "__main__":
    run_cli(main)
