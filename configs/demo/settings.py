"""The demo's data sizes, model sizes and its one tuning rule; where its configs read and write.

``tools/run_demo.py`` sets ``BCT_DEMO_DATA``, ``BCT_DEMO_OUT``, ``BCT_DEMO_SCENARIO``,
``BCT_DEMO_QUICK``, the size overrides ``BCT_DEMO_<NAME>`` of :data:`SIZES` (``--identities`` …
``--new_epochs``) and, per new model, ``BCT_DEMO_SEED`` (0, 1, … with ``--seeds``), so the shipped
demo configs follow its options; run by hand, they default to ``dataset/synthetic``,
``work_dirs/demo``, ``OPclass``, the full size and seed 0.

**Tuning rule.** Every method runs with its published hyper-parameters: the keys of
``BCT_methods/<Method>/configs/base.py`` are not changed. What all methods share is changed once,
for all of them: every new model (the independent one included) trains the same ArcFace classifier
with margin 0.3 and scale 32, because with the published 0.5 and 64 this small network never leaves
the starting plateau on a CPU budget (loss stuck at 38 ≈ 64·sin 0.5 + ln 1400 after 2 of 5 epochs:
target cosines stay at 0, the model learns nothing). Quantities that the published code ties to
the size of the data or the length of the run are converted, the same way for every method:

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
QUICK = os.environ.get("BCT_DEMO_QUICK", "0") == "1"
SEED_INDEX = int(os.environ.get("BCT_DEMO_SEED", "0"))

# profile → (synthetic identities, images per identity, IJB-C-style subjects, old-model epochs, new-model epochs)
SIZES = ("IDENTITIES", "IMAGES_PER_IDENTITY", "IJB_SUBJECTS", "OLD_EPOCHS", "NEW_EPOCHS")
PROFILES = {"full": (400, 20, 3200, 2, 6), "quick": (40, 10, 24, 2, 2)}
IJB_MAX_FRAMES = 2   # IJB-C-style probe videos of 2 frames (make_synthetic's default: 2–5): 26 % fewer images to embed


def sizes(environ=os.environ):
    """The profile's sizes, each replaced by ``BCT_DEMO_<NAME>`` when set (run_demo.py's size options)."""
    values = dict(zip(SIZES, PROFILES["quick" if environ.get("BCT_DEMO_QUICK", "0") == "1" else "full"]))
    for name in SIZES:
        text = environ.get(f"BCT_DEMO_{name}")
        if text is not None:
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"BCT_DEMO_{name}={text!r}: expected a positive whole number")
            values[name] = int(text)
    return tuple(values[name] for name in SIZES)


IDENTITIES, IMAGES_PER_IDENTITY, IJB_SUBJECTS, OLD_EPOCHS, NEW_EPOCHS = sizes()

EMBEDDING_SIZE = 128
INPUT_SIZE = 32
BATCH_SIZE = 64
OLD_NETWORK, OLD_WIDTH = "r18", 8       # the old model: r18 layout, 8-channel stem
NEW_NETWORK, NEW_WIDTH = "r18", 12      # every new model: the same layout, 1.5x wider (2.2x the FLOPs)
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
    """The demo's old model (softmax, narrower, trained shorter on the old split)."""
    config = common(config, OLD_NETWORK, OLD_WIDTH, OLD_SPLIT, name)
    config.num_epoch = OLD_EPOCHS
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
    config.lr = 0.1
    config.warmup_epoch = 0
    config.fp16 = False
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
