"""Step 4 (MixBCT denoising): per class keep the fraction T of old features nearest the class centre.

    python tools/get_feature/denoise_credible.py --T 0.9 --SD f128_r18_softmax_class70 [--no_column_norm]

Writes ``<SD>_credible_ratio_<round(100·T)>_feature.npy``: uint8, one entry per image in dataset
order, 1 = credible. L2-normalise every feature, then (as the published denoiser) scale every
feature column to unit L2 norm over the whole dataset; per class take the mean of these features
and mark the ceil(T·n) samples with the smallest Euclidean distance to it (ties: earlier image
first). ``--no_column_norm`` leaves out the column scaling (the rule as the paper states it).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from utils.errors import UserError, about_file, run_cli
from utils.feature_stats import credible_mask
from utils.old_features import add_sd_args, load_features
from utils.scenarios import credible_kind, feature_path, parse_sd
from utils.io import atomic_np_save


def main(argv=None):
    parser = argparse.ArgumentParser(description="Mark the credible old features of each class (MixBCT).")
    parser.add_argument("--T", type=float, default=0.9, help="fraction of each class kept, in [0, 1]")
    parser.add_argument("--column_norm", dest="column_norm", action="store_true", default=True,
                        help="normalise feature columns over the dataset after the rows (default, as published)")
    parser.add_argument("--no_column_norm", dest="column_norm", action="store_false",
                        help="rows only: leave out the published column normalisation")
    add_sd_args(parser)
    args = parser.parse_args(argv)
    if not 0.0 <= args.T <= 1.0:
        raise UserError(f"--T must be in [0, 1], got {args.T}")
    parse_sd(args.SD)
    features, labels = load_features(args.SD, args.output)
    with about_file(feature_path(args.SD, "feature", args.output)):
        mask = credible_mask(features, labels, args.T, column_norm=args.column_norm)
    out = feature_path(args.SD, credible_kind(args.T), args.output)
    atomic_np_save(out, mask)
    print(f"saved {out}: {int(mask.sum())} of {len(mask)} samples credible")


if __name__ == "__main__":
    run_cli(main)
