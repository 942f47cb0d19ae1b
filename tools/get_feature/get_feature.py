"""Step 2: embed the new training split with the old model → ``<SD>_feature.npy``, ``<SD>_label.npy``.

    python tools/get_feature/get_feature.py configs/f128_r18_softmax_class30.py --SD f128_r18_softmax_class70
    torchrun --nproc_per_node=2 tools/get_feature/get_feature.py <old config> --SD <SD>

The old model is ``work_dirs/<config name>/model.pt`` (the config's ``output``). The split comes from
the SD suffix, beside the config's ``rec`` (class70 → ``train_part_70_class`` …, class100/data100 →
the full ``train`` set); files go to ``feature_save/<scenario>/``. Raw (un-normalised) float32
embeddings without flip, in dataset order; labels int64. Finished chunks of images are kept in
``work_dirs/cache/get_feature/`` (``$BCT_CACHE_DIR``, ``--cache_dir``), so rerunning an interrupted
command embeds only what is missing (docs/features.md).

A deployed old model (ONNX or TorchScript, e.g. insightface's ``w600k_r50.onnx``) with its preprocessing:

    python tools/get_feature/get_feature.py --model w600k_r50.onnx --input_size 112 \
        --preprocess mean=127.5,std=127.5,rgb,flip_sum --dataset dataset/mine/train --SD f512_w600k_arc_class100
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from utils.config import add_config_args, get_config
from utils.errors import run_cli
from tools.get_feature.extract import add_extract_args, extract_from_args
from utils.old_features import add_sd_args
from utils.scenarios import parse_sd


def main(argv=None):
    parser = argparse.ArgumentParser(description="Extract old-model features of the new training split.")
    parser.add_argument("config", nargs="?", help="config of the old model (work_dirs/<name>/model.pt); "
                                                  "optional with --model and --dataset")
    add_extract_args(add_sd_args(parser))
    add_config_args(parser, positional=False)
    args = parser.parse_args(argv)
    parse_sd(args.SD)
    cfg = get_config(args.config, args.overrides) if args.config else None
    paths = extract_from_args(cfg, args)
    if paths:
        print(f"saved {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run_cli(main)
