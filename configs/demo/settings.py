"""Where the demo configs read and write, and the demo's model sizes.

``tools/run_demo.py`` sets ``BCT_DEMO_DATA``, ``BCT_DEMO_OUT`` and ``BCT_DEMO_SCENARIO`` so the
shipped demo configs follow its ``--out`` and ``--scenario`` options; run by hand, they default to
``dataset/synthetic``, ``work_dirs/demo`` and ``OPclass``.
"""
import os

DATA = os.environ.get("BCT_DEMO_DATA", "dataset/synthetic")
OUT = os.environ.get("BCT_DEMO_OUT", "work_dirs/demo")
SCENARIO = os.environ.get("BCT_DEMO_SCENARIO", "OPclass")
QUICK = os.environ.get("BCT_DEMO_QUICK", "0") == "1"

EMBEDDING_SIZE = 128
INPUT_SIZE = 32
OLD_NETWORK, OLD_WIDTH = "r18", 8       # the old model: r18 layout, 8-channel stem
NEW_NETWORK, NEW_WIDTH = "r18", 12      # every new model: the same layout, 1.5x wider (2.2x the FLOPs)
# ArcFace for the new models with a milder margin and scale than the published (0.5, 64), which a
# network this small does not fit in a few CPU epochs
NEW_MARGIN_LIST, NEW_SCALE = (1.0, 0.3, 0.0), 32.0

# scenario: (old model's training split, new model's training split, split the features are extracted on)
SCENARIOS = {
    "OPclass": ("train_part_30_class", "train_part_70_class", "class70"),
    "OPdata": ("train_part_30_data", "train_part_70_data", "data70"),
    "EXclass": ("train_part_30_class", "train", "class100"),
    "EXdata": ("train_part_30_data", "train", "data100"),
}
if SCENARIO not in SCENARIOS:
    raise ValueError(f"BCT_DEMO_SCENARIO={SCENARIO!r}: expected one of {', '.join(SCENARIOS)}")
OLD_SPLIT, NEW_SPLIT, FEATURE_SPLIT = SCENARIOS[SCENARIO]
SD = f"f{EMBEDDING_SIZE}_{OLD_NETWORK}_softmax_{FEATURE_SPLIT}"


def rec(split):
    """Training data of a split: the full set is the data folder itself."""
    return DATA if split == "train" else os.path.join(DATA, split)


def feature(kind):
    """Path of an old-feature file of this scenario (kind: feature, avg_feature, credible_ratio_90_feature)."""
    return os.path.join(OUT, "feature_save", SCENARIO, f"{SD}_{kind}.npy")


def old_model(config, name):
    """The demo's old model (softmax, trained on the old split)."""
    return common(config, OLD_NETWORK, OLD_WIDTH, OLD_SPLIT, name)


def new_model(config, name):
    """The demo's new model (ArcFace, trained on the new split): the independent one and every method."""
    config = common(config, NEW_NETWORK, NEW_WIDTH, NEW_SPLIT, name)
    config.margin_list = NEW_MARGIN_LIST
    config.scale = NEW_SCALE
    return config


def common(config, network, width, split, name):
    """Keys every demo training config shares: a small CPU model, data of ``split``, output under OUT."""
    config.network = network
    config.embedding_size = EMBEDDING_SIZE
    config.network_width = width
    config.input_size = INPUT_SIZE
    config.rec = rec(split)
    config.output = os.path.join(OUT, name)
    config.batch_size = 64
    config.lr = 0.1
    config.num_epoch = 2 if QUICK else 6
    config.warmup_epoch = 0
    config.fp16 = False
    config.num_workers = 0
    config.frequent = 20
    config.save_every_steps = 0
    config.keep_checkpoints = 1
    return config


def scaled_epoch(epoch, num_epoch, published_epochs=35):
    """An epoch of the published 35-epoch schedule mapped onto a shorter run (at least 1)."""
    return max(1, round(epoch * num_epoch / published_epochs))
