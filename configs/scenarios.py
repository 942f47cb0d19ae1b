"""The published experiments' shared keys: data split, counts and old-feature paths of a scenario.

A shipped config states only what is its own and takes the rest from here::

    from configs.scenarios import Experiment
    run = Experiment("OPclass", "softmax_to_arc_f128")      # scenario, combination
    config = run.new_model()                                 # r50 ArcFace new model on class70
    config.old_embedding = run.feature("feature")            # feature_save/OPclass/f128_r18_softmax_class70_feature.npy

Old models and independent references: ``old_model(split, loss, dim)`` and
``independent_model(dim)``. Paths are relative to the repository root (see utils/config.py).
"""
from easydict import EasyDict as edict

from utils.errors import UserError
from utils.scenarios import SCENARIOS, SPLITS, feature_path, require_choice, sd_name, training_rec

DATASET = "dataset/ms1m-retinaface-t1"
OLD_NETWORK, NEW_NETWORK = "r18", "r50"
OLD_LOSSES = ("softmax", "arc")

# The published OPclass configs of these methods kept the OPdata counts (93,431 classes, 3,625,372
# images) on class70: 28,029 ArcFace centres that no label uses (extra negatives) and a schedule sized
# for 3,625,372 images. Set num_classes = num_image = None in a config to size both from the data.
OPDATA_COUNTS_ON_OPCLASS = ("MixBCT", "L2", "weakenedL2")


def training_keys(network, dim, split):
    """Keys of every published training run: ``network`` with ``dim``-d embeddings on ``split`` (8 GPUs × 128)."""
    require_choice(split, SPLITS, "split")
    _, classes, images = SPLITS[split]
    config = edict()
    config.network = network
    config.embedding_size = dim
    config.rec = training_rec(DATASET, split)
    config.num_classes = classes
    config.num_image = images
    config.num_workers = 4
    return config


def old_model(split, loss, dim):
    """Step 1: the old r18 model (``loss`` softmax or arc) on the 30 % ``split`` (class30 | data30)."""
    require_choice(loss, OLD_LOSSES, "old loss")
    config = training_keys(OLD_NETWORK, dim, split)
    if loss == "arc":
        config.backbone_amp = "none"  # the published train_old_arc.py backbone ran in fp32 (no autocast)
    return config


def independent_model(dim):
    """The independent r50 ArcFace reference on the whole training set (train_old_arc.py: fp32 backbone)."""
    config = training_keys(NEW_NETWORK, dim, "full")
    config.backbone_amp = "none"
    return config


class Experiment:
    """One published step-5 experiment: ``scenario`` × ``combination`` (e.g. ``softmax_to_arc_f128``);
    ``method`` (e.g. ``"MixBCT"``) only matters where its published counts differ from the split's."""

    def __init__(self, scenario, combination, method=None):
        require_choice(scenario, SCENARIOS, "scenario")
        old_loss, dim = _parse_combination(combination)
        _, self.new_split, feature_split = SCENARIOS[scenario]
        self.scenario, self.dim, self.method = scenario, dim, method
        self.sd = sd_name(dim, OLD_NETWORK, old_loss, feature_split)

    def new_model(self):
        """Keys of the new r50 ArcFace model trained on this scenario's new split."""
        config = training_keys(NEW_NETWORK, self.dim, self.new_split)
        if self.scenario == "OPclass" and self.method in OPDATA_COUNTS_ON_OPCLASS:
            _, config.num_classes, config.num_image = SPLITS["data70"]
        return config

    def feature(self, kind):
        """Path of an old-feature file (kind: feature, avg_feature, credible_ratio_90)."""
        return feature_path(self.sd, kind)


def _parse_combination(combination):
    """``"softmax_to_arc_f128"`` → ("softmax", 128): the old model's loss and the embedding size."""
    parts = combination.split("_")
    if len(parts) != 4 or parts[1] != "to" or parts[0] not in OLD_LOSSES or parts[2] != "arc" \
            or not parts[3].startswith("f") or not parts[3][1:].isdigit():
        raise UserError(f"combination {combination!r}: expected <softmax|arc>_to_arc_f<dim>")
    return parts[0], int(parts[3][1:])
