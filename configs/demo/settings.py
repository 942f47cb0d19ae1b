"""The demo's profiles (data sizes, model sizes and its one training rule); where its configs read and write.

``tools/run_demo.py`` sets ``BCT_DEMO_DATA``, ``BCT_DEMO_OUT``, ``BCT_DEMO_SCENARIO``, ``BCT_DEMO_PROFILE``
(full, quick or long), the overrides ``BCT_DEMO_<NAME>`` of :data:`SIZES` (``--identities`` …
``--warmup_epochs``) and, per new model, ``BCT_DEMO_SEED`` (0, 1, … with ``--seeds``), so the shipped
demo configs follow its options; run by hand, they default to ``dataset/synthetic``,
``work_dirs/demo``, ``OPclass``, the full profile and seed 0.

**Training rule.** Every method runs with its published hyper-parameters: the keys of
``BCT_methods/<Method>/configs/base.py`` are not changed. What all models share is changed once,
for all of them (the old model, the independent new model and every method):

- learning rate ``LR`` with ``WARMUP_EPOCHS`` of linear warm-up, then the published poly decay:
  0.2 and 1 epoch, so that every model's classification loss ends far below that of a useless
  model (with the earlier 0.1 and no warm-up the independent model stopped at a loss of 11.2
  against ln 1,400 = 7.2 on 2,000 identities, under-trained, and distorted every comparison);
- every new model trains the same ArcFace classifier with margin 0.3 and scale 32: with the
  published 0.5 and 64 this small network never leaves the starting plateau on a CPU budget
  (loss stuck at 38 ≈ 64·sin 0.5 + ln 1400: target cosines stay at 0).

Quantities that the published code ties to the size of the data or the length of the run are
converted, the same way for every method:

- an epoch of the published 35-epoch schedule becomes the same fraction of the demo's epochs
  (:func:`scaled_epoch`: UniBCT's refinement epochs and its learning-rate steps);
- a buffer sized as a part of the training set keeps the published fraction of it
  (:func:`same_fraction`: NCCL's queue, 8,192 of the 3,598,269 class70 images = 0.23 %), but
  holds at least one global batch, which the method enqueues whole.

The demo's regime is the paper's: the old model is narrower and trained shorter on 30 % of the
identities, the new models are wider and trained longer on the other 70 %.
"""
import os

from configs.base import config as published_base
from configs.scenarios import SPLITS as PUBLISHED_SPLITS

DATA = os.environ.get("BCT_DEMO_DATA", "dataset/synthetic")
OUT = os.environ.get("BCT_DEMO_OUT", "work_dirs/demo")
SCENARIO = os.environ.get("BCT_DEMO_SCENARIO", "OPclass")
SEED_INDEX = int(os.environ.get("BCT_DEMO_SEED", "0"))

# the settings a profile fixes and run_demo.py's options override (BCT_DEMO_<NAME>): name → type
SIZES = {"IDENTITIES": int, "IMAGES_PER_IDENTITY": int, "IJB_SUBJECTS": int, "OLD_EPOCHS": int,
         "NEW_EPOCHS": int, "OLD_WIDTH": int, "NEW_WIDTH": int, "LR": float, "WARMUP_EPOCHS": int}
RULE = dict(LR=0.2, WARMUP_EPOCHS=1)   # the training rule of every model, in every profile
PROFILES = {   # the full profile's sizes come from a measured grid (docs/demo.md)
    "full": dict(IDENTITIES=2000, IMAGES_PER_IDENTITY=8, IJB_SUBJECTS=3200, OLD_EPOCHS=2, NEW_EPOCHS=6,
                 OLD_WIDTH=8, NEW_WIDTH=12, **RULE),
    "quick": dict(IDENTITIES=40, IMAGES_PER_IDENTITY=10, IJB_SUBJECTS=24, OLD_EPOCHS=2, NEW_EPOCHS=2,
                  OLD_WIDTH=8, NEW_WIDTH=12, **RULE),
}
PROFILE = os.environ.get("BCT_DEMO_PROFILE", "full")
if PROFILE not in PROFILES:
    raise ValueError(f"BCT_DEMO_PROFILE={PROFILE!r}: expected one of {', '.join(PROFILES)}")
IJB_MAX_FRAMES = 2   # IJB-C-style probe videos of 2 frames (make_synthetic's default: 2–5): 26 % fewer images to embed


def sizes(environ=os.environ):
    """The profile's settings (:data:`SIZES`), each replaced by ``BCT_DEMO_<NAME>`` when set."""
    values = dict(PROFILES[environ.get("BCT_DEMO_PROFILE", "full")])
    for name, kind in SIZES.items():
        text = environ.get(f"BCT_DEMO_{name}")
        if text is None:
            continue
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (value < 0 if name == "WARMUP_EPOCHS" else value <= 0):
            what = "a positive number" if kind is float else "a whole number" if name == "WARMUP_EPOCHS" \
                else "a positive whole number"
            raise ValueError(f"BCT_DEMO_{name}={text!r}: expected {what}")
        values[name] = value
    return values


_values = sizes()
IDENTITIES, IMAGES_PER_IDENTITY, IJB_SUBJECTS, OLD_EPOCHS, NEW_EPOCHS, OLD_WIDTH, NEW_WIDTH, LR, WARMUP_EPOCHS = \
    (_values[name] for name in SIZES)

EMBEDDING_SIZE = 128
INPUT_SIZE = 32
BATCH_SIZE = 64
OLD_NETWORK = NEW_NETWORK = "r18"        # r18 layout; stems of OLD_WIDTH and NEW_WIDTH channels
NEW_MARGIN_LIST, NEW_SCALE = (1.0, 0.3, 0.0), 32.0   # every new model's ArcFace (published: 0.5, 64)
PUBLISHED_EPOCHS = published_base.num_epoch                 # 35
PUBLISHED_CLASS70_IMAGES = PUBLISHED_SPLITS["class70"][2]   # 3,598,269: the published OPclass training set

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


def run_name(name, seed_index=None):
    """Output folder name of a new model: ``name`` for seed 0, ``name_seed<k>`` for the k-th extra seed."""
    seed_index = SEED_INDEX if seed_index is None else seed_index
    return name if seed_index == 0 else f"{name}_seed{seed_index}"


def new_split_images():
    """Images of the new model's training split, from the sizes above and the 0.3 split rule."""
    old_identities = round(0.3 * IDENTITIES)
    return {"train_part_70_class": (IDENTITIES - old_identities) * IMAGES_PER_IDENTITY,
            "train_part_70_data": IDENTITIES * (IMAGES_PER_IDENTITY - max(1, round(0.3 * IMAGES_PER_IDENTITY))),
            "train": IDENTITIES * IMAGES_PER_IDENTITY}[NEW_SPLIT]


def old_model(config, name):
    """The demo's old model (softmax, narrower, trained shorter on the old split). Its classifier is the
    Partial FC softmax head, with which the profiles, the grid and the seeds were measured (docs/demo.md);
    the published linear head (``softmax_head = "linear"``, the toolkit's default) is not yet measured here."""
    config = common(config, OLD_NETWORK, OLD_WIDTH, OLD_SPLIT, name)
    config.num_epoch = OLD_EPOCHS
    config.softmax_head = "partial_fc"
    return config


def new_model(config, name):
    """The demo's new model (ArcFace, on the new split), one per seed."""
    config = common(config, NEW_NETWORK, NEW_WIDTH, NEW_SPLIT, run_name(name))
    config.margin_list = NEW_MARGIN_LIST
    config.scale = NEW_SCALE
    config.num_epoch = NEW_EPOCHS
    config.seed = 666 + SEED_INDEX
    return config


def common(config, network, width, split, name):
    """Keys every demo training config shares: a small CPU model, data of ``split``, output under OUT."""
    config.network = network
    config.embedding_size = EMBEDDING_SIZE
    config.network_width = width
    config.input_size = INPUT_SIZE
    config.rec = rec(split)
    config.output = os.path.join(OUT, name)
    config.batch_size = BATCH_SIZE
    config.lr = LR
    config.warmup_epoch = WARMUP_EPOCHS
    config.fp16 = False
    config.channels_last = True   # 1.20x the training images/s of the new models here (bench_demo_training.py)
    config.num_workers = 0
    config.frequent = 20
    config.save_every_steps = 0
    config.keep_checkpoints = 1
    return config


def scaled_epoch(epoch, num_epoch=None):
    """An epoch of the published 35-epoch schedule mapped onto the demo's run (at least 1)."""
    num_epoch = NEW_EPOCHS if num_epoch is None else num_epoch
    return max(1, round(epoch * num_epoch / PUBLISHED_EPOCHS))


def same_fraction(published_size, published_images=PUBLISHED_CLASS70_IMAGES, at_least=BATCH_SIZE):
    """A buffer of ``published_size`` entries over ``published_images`` scaled to the demo's new split."""
    return max(at_least, round(published_size * new_split_images() / published_images))


def published(method):
    """The published defaults of a method: its folder's ``configs/base.py``."""
    import importlib

    return importlib.import_module(f"BCT_methods.{method}.configs.base").config
