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

DATASET = "dataset/ms1m-retinaface-t1"
OLD_NETWORK, NEW_NETWORK = "r18", "r50"
OLD_LOSSES = ("softmax", "arc")

# training split → (rec below DATASET, identities, images; None = read from the data)
SPLITS = {
    "class30": ("train_part_30_class", 28029, 1581241),
    "class70": ("train_part_70_class", 65402, 3598269),
    "data30": ("train_part_30_data", 93431, None),
    "data70": ("train_part_70_data", 93431, None),
    "full": ("", 93431, 5179510),
}
# scenario → (old model's training split, new model's training split, split the old features are extracted on)
SCENARIOS = {
    "OPclass": ("class30", "class70", "class70"),
    "OPdata": ("data30", "data70", "data70"),
    "EXclass": ("class30", "full", "class100"),
    "EXdata": ("data30", "full", "data100"),
}


def training_keys(network, dim, split):
    """Keys of every published training run: ``network`` with ``dim``-d embeddings on ``split`` (8 GPUs × 128)."""
    require_choice(split, SPLITS, "split")
    folder, classes, images = SPLITS[split]
    config = edict()
    config.network = network
    config.embedding_size = dim
    config.rec = f"{DATASET}/{folder}" if folder else DATASET
    config.num_classes = classes
    config.num_image = images
    config.num_workers = 4
    return config


def old_model(split, loss, dim):
    """Step 1: the old r18 model (``loss`` softmax or arc) on the 30 % ``split`` (class30 | data30)."""
    require_choice(loss, OLD_LOSSES, "old loss")
    return training_keys(OLD_NETWORK, dim, split)


def independent_model(dim):
    """The independent r50 ArcFace reference on the whole training set."""
    return training_keys(NEW_NETWORK, dim, "full")


class Experiment:
    """One published step-5 experiment: ``scenario`` × ``combination`` (e.g. ``softmax_to_arc_f128``)."""

    def __init__(self, scenario, combination):
        require_choice(scenario, SCENARIOS, "scenario")
        old_loss, dim = _parse_combination(combination)
        _, self.new_split, feature_split = SCENARIOS[scenario]
        self.scenario, self.dim = scenario, dim
        self.sd = f"f{dim}_{OLD_NETWORK}_{old_loss}_{feature_split}"

    def new_model(self):
        """Keys of the new r50 ArcFace model trained on this scenario's new split."""
        return training_keys(NEW_NETWORK, self.dim, self.new_split)

    def feature(self, kind):
        """Path of an old-feature file (kind: feature, avg_feature, credible_ratio_90_feature)."""
        return f"feature_save/{self.scenario}/{self.sd}_{kind}.npy"


def _parse_combination(combination):
    """``"softmax_to_arc_f128"`` → ("softmax", 128): the old model's loss and the embedding size."""
    parts = combination.split("_")
    if len(parts) != 4 or parts[1] != "to" or parts[0] not in OLD_LOSSES or parts[2] != "arc" \
            or not parts[3].startswith("f") or not parts[3][1:].isdigit():
        raise UserError(f"combination {combination!r}: expected <softmax|arc>_to_arc_f<dim>")
    return parts[0], int(parts[3][1:])


def require_choice(value, choices, what):
    """Raise UserError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserError(f"{what} {value!r}: expected one of {', '.join(choices)}")
