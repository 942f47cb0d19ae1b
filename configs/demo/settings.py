"""The demo's settings: profiles (data sizes, model sizes and its one training rule) and the keys of
each of its configs for any profile (:class:`Demo`).

The demo's configs (``configs/demo/old_softmax.py``, ``configs/demo/independent.py``,
``BCT_methods/<Method>/configs/demo_<Method>.py``) are plain data: the full profile's values, written
out. ``tools/run_demo.py`` builds a :class:`Demo` from its options and passes each key whose value
differs from the file's with ``--set`` (the stage logs show the commands); :meth:`Demo.keys` is the one
place where the demo's values are computed, and a test checks that the files hold the full profile's.

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
  (:meth:`Demo.scaled_epoch`: UniBCT's refinement epochs and its learning-rate steps);
- a buffer sized as a part of the training set keeps the published fraction of it
  (:meth:`Demo.same_fraction`: NCCL's queue, 8,192 of the 3,598,269 class70 images = 0.23 %), but
  holds at least one global batch, which the method enqueues whole.

The demo's regime is the paper's: the old model is narrower and trained shorter on 30 % of the
identities, the new models are wider and trained longer on the other 70 %.
"""
import copy

from easydict import EasyDict as edict

from configs.base import config as published_base

from utils.config import PATH_KEYS, format_override, resolve_path
from utils.errors import UserError
from utils.scenarios import SCENARIOS, SPLITS, feature_path, require_choice, sd_name, training_rec

RULE = dict(LR=0.2, WARMUP_EPOCHS=1)   # the training rule of every model, in every profile
PROFILES = {   # the full profile's sizes come from a measured grid (docs/demo.md)
    "full": dict(IDENTITIES=2000, IMAGES_PER_IDENTITY=8, IJB_SUBJECTS=3200, OLD_EPOCHS=2, NEW_EPOCHS=6,
                 OLD_WIDTH=8, NEW_WIDTH=12, **RULE),
    "quick": dict(IDENTITIES=40, IMAGES_PER_IDENTITY=10, IJB_SUBJECTS=24, OLD_EPOCHS=2, NEW_EPOCHS=2,
                  OLD_WIDTH=8, NEW_WIDTH=12, **RULE),
}
SIZES = tuple(PROFILES["full"])   # the settings a profile fixes and run_demo.py's options override
PUBLISHED_EPOCHS = published_base.num_epoch          # 35: the published schedule
PUBLISHED_CLASS70_IMAGES = SPLITS["class70"][2]   # 3,598,269: the published OPclass training set
# the old-feature files each method's demo config reads: config key → file kind
METHOD_FEATURES = {
    "L2": {"old_embedding": "feature"},
    "BCT": {"old_prototype": "avg_feature"},
    "UniBCT": {"old_prototype": "avg_feature", "old_embedding": "feature"},
    "NCCL": {"old_embedding": "feature"},
    "AdvBCT": {"old_embedding": "feature"},
    "MixBCT": {"old_embedding": "feature", "credible_old_feature": "credible_ratio_90"},
}


class Demo:
    """One demo run's settings: a profile with options over it (``identities=…`` as in :data:`SIZES`,
    lower case), the data and output folders, the scenario and the seed (0, 1, … with ``--seeds``)."""

    EMBEDDING_SIZE = 128
    INPUT_SIZE = 32
    BATCH_SIZE = 64
    OLD_NETWORK = NEW_NETWORK = "r18"        # r18 layout; stems of OLD_WIDTH and NEW_WIDTH channels
    NEW_MARGIN_LIST, NEW_SCALE = (1.0, 0.3, 0.0), 32.0   # every new model's ArcFace (published: 0.5, 64)
    IJB_MAX_FRAMES = 2   # IJB-C-style probe videos of 2 frames (make_synthetic's default: 2–5): 26 % fewer images

    def __init__(self, profile="full", data="dataset/synthetic", out="work_dirs/demo", scenario="OPclass",
                 seed_index=0, **sizes):
        require_choice(profile, PROFILES, "profile")
        require_choice(scenario, SCENARIOS, "scenario")
        values = dict(PROFILES[profile])
        for option, value in sizes.items():
            name = option.upper()
            require_choice(name, SIZES, "demo setting")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (value < 0 if name == "WARMUP_EPOCHS" else value <= 0) or (name != "LR" and value != int(value)):
                what = "a positive number" if name == "LR" else "a whole number of 0 or more" \
                    if name == "WARMUP_EPOCHS" else "a positive whole number"
                raise UserError(f"--{option} {value!r}: expected {what}")
            values[name] = value
        self.__dict__.update(values)
        self.PROFILE, self.DATA, self.OUT, self.SCENARIO, self.SEED_INDEX = profile, data, out, scenario, seed_index
        self.OLD_SPLIT, self.NEW_SPLIT, self.FEATURE_SPLIT = SCENARIOS[scenario]
        self.SD = sd_name(self.EMBEDDING_SIZE, self.OLD_NETWORK, "softmax", self.FEATURE_SPLIT)

    def seeded(self, seed_index):
        """These settings for the ``seed_index``-th seed of every new model."""
        other = copy.copy(self)
        other.SEED_INDEX = seed_index
        return other

    def sizes(self):
        """The values of :data:`SIZES` (option name → value)."""
        return {name.lower(): getattr(self, name) for name in SIZES}

    def rec(self, split):
        """Training data of a split in the run's data folder."""
        return training_rec(self.DATA, split)

    def feature(self, kind, sd=None):
        """Path of an old-feature file of this run (kind: feature, label, avg_feature, credible_ratio_90)."""
        return feature_path(sd or self.SD, kind, resolve_path(f"{self.OUT}/feature_save/{self.SCENARIO}"))

    def run_name(self, name, seed_index=None):
        """Output folder name of a new model: ``name`` for seed 0, ``name_seed<k>`` for the k-th extra seed."""
        seed_index = self.SEED_INDEX if seed_index is None else seed_index
        return name if seed_index == 0 else f"{name}_seed{seed_index}"

    def new_split_images(self):
        """Images of the new model's training split, from the sizes above and the 0.3 split rule."""
        old_identities = round(0.3 * self.IDENTITIES)
        return {"class70": (self.IDENTITIES - old_identities) * self.IMAGES_PER_IDENTITY,
                "data70": self.IDENTITIES * (self.IMAGES_PER_IDENTITY - max(1, round(0.3 * self.IMAGES_PER_IDENTITY))),
                "full": self.IDENTITIES * self.IMAGES_PER_IDENTITY}[self.NEW_SPLIT]

    def scaled_epoch(self, epoch):
        """An epoch of the published 35-epoch schedule mapped onto the demo's new models (at least 1)."""
        return max(1, round(epoch * self.NEW_EPOCHS / PUBLISHED_EPOCHS))

    def same_fraction(self, published_size, published_images=PUBLISHED_CLASS70_IMAGES):
        """A buffer of ``published_size`` entries over ``published_images`` scaled to the demo's new split
        (at least one batch)."""
        return max(self.BATCH_SIZE, round(published_size * self.new_split_images() / published_images))

    def keys(self, name, sd=None):
        """The keys of demo config ``name`` (``old_softmax``, ``independent`` or a method) in this run;
        ``sd``: another set of old features for a method (the third generation's)."""
        if name == "old_softmax":   # Partial FC head, as the profiles were measured (published head: docs/methods.md row 11)
            keys = self._common(self.OLD_WIDTH, self.OLD_SPLIT, name)
            keys.update(num_epoch=self.OLD_EPOCHS, softmax_head="partial_fc")
            return keys
        keys = self._common(self.NEW_WIDTH, self.NEW_SPLIT, self.run_name(name))
        keys.update(margin_list=self.NEW_MARGIN_LIST, scale=self.NEW_SCALE, num_epoch=self.NEW_EPOCHS,
                    seed=666 + self.SEED_INDEX)
        if name == "independent":
            return keys
        require_choice(name, METHOD_FEATURES, "demo method")
        keys.update({key: self.feature(kind, sd) for key, kind in METHOD_FEATURES[name].items()})
        published_keys = published(name)
        if name == "NCCL":   # the published queue holds 0.23 % of the training set (at least one global batch)
            keys.update(queue_size=self.same_fraction(published_keys.queue_size))
        if name == "UniBCT":   # the published refinement epochs and lr steps (of 35 epochs) scaled to the demo
            keys.update(refine_epochs=tuple(sorted({self.scaled_epoch(e) for e in published_keys.refine_epochs})),
                        lr_steps=tuple(sorted({self.scaled_epoch(e) for e in published_keys.lr_steps})))
        return keys

    def overrides(self, name, config, extra=None, sd=None):
        """``--set`` items for the keys of :meth:`keys` (and ``extra``) whose values differ from ``config``
        (the demo config file, loaded); paths compared resolved."""
        wanted = dict(self.keys(name, sd), **(extra or {}))
        return [format_override(key, value) for key, value in wanted.items()
                if _resolved(key, value) != _resolved(key, config.get(key))]

    def _common(self, width, split, name):
        """Keys every demo training config shares: a small CPU model, data of ``split``, output under OUT."""
        return dict(network=self.OLD_NETWORK if name == "old_softmax" else self.NEW_NETWORK,
                    embedding_size=self.EMBEDDING_SIZE, network_width=width, input_size=self.INPUT_SIZE,
                    rec=self.rec(split), output=f"{self.OUT}/{name}", batch_size=self.BATCH_SIZE, lr=self.LR,
                    warmup_epoch=self.WARMUP_EPOCHS, fp16=False,
                    channels_last=True,   # 1.20x the training images/s of the new models here (bench_demo_training.py)
                    num_workers=0, frequent=20, save_every_steps=0, keep_checkpoints=1)


def _resolved(key, value):
    """``value`` as a loaded config holds it: paths resolved, sequences as tuples."""
    if key in PATH_KEYS and isinstance(value, str):
        return resolve_path(value)
    return tuple(value) if isinstance(value, list) else value


def published(method):
    """The published defaults of a method: its folder's ``configs/base.py``."""
    import importlib

    return edict(importlib.import_module(f"BCT_methods.{method}.configs.base").config)
