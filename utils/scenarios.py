"""The experiments' vocabulary, in one place: data splits, scenarios, old-feature names (SD) and files.

A **split** is a training set that ``tools/split_dataset/split_dataset_ms1mv3.py`` writes beside the full
set (``full``: the data folder itself). A **scenario** names the old model's split, the new model's
split and the split the old features are extracted on. An **SD** ("scenario detail") names one set of
old features, ``<name>_<feature split>``, by convention ``f<d>_<old backbone>_<old loss>_<feature split>``
(:func:`sd_name`); its files live in ``feature_save/<scenario>/<SD>_<kind>.npy`` (:func:`feature_path`).
Kinds: ``feature``, ``label``, ``avg_feature``, ``credible_ratio_<100T>`` (:func:`credible_kind`).
"""
import os
import re

from utils.config import ROOT
from utils.errors import UserError

FEATURE_ROOT = os.path.join(ROOT, "feature_save")

# split → (rec prefix inside the data folder, num_classes, num_image) as the published configs set them;
# the data splits' num_image is the published 5,179,510 − 1,554,138, whatever the split files hold
SPLITS = {
    "class30": ("train_part_30_class", 28029, 1581241),
    "class70": ("train_part_70_class", 65402, 3598269),
    "data30": ("train_part_30_data", 93431, 1554138),
    "data70": ("train_part_70_data", 93431, 3625372),
    "full": ("train", 93431, 5179510),
}
# scenario → (old model's split, new model's split, feature split: the last part of its SDs)
SCENARIOS = {
    "OPclass": ("class30", "class70", "class70"),
    "OPdata": ("data30", "data70", "data70"),
    "EXclass": ("class30", "full", "class100"),
    "EXdata": ("data30", "full", "data100"),
}
# feature split → (scenario whose folder holds its files, training split it is extracted on)
FEATURE_SPLITS = {"class70": ("OPclass", "class70"), "class30": ("OPclass", "class30"),
                  "data70": ("OPdata", "data70"), "data30": ("OPdata", "data30"),
                  "class100": ("EXclass", "full"), "data100": ("EXdata", "full")}
KINDS = re.compile(r"feature|label|avg_feature|credible_ratio_\d+")


def require_choice(value, choices, what):
    """Raise UserError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UserError(f"{what} {value!r}: expected one of {', '.join(choices)}")


def sd_name(dim, network, loss, feature_split):
    """``f<dim>_<network>_<loss>_<feature split>``, e.g. ``f128_r18_softmax_class70``."""
    require_choice(feature_split, FEATURE_SPLITS, "feature split")
    return f"f{dim}_{network}_{loss}_{feature_split}"


def parse_sd(sd):
    """``(embedding size or None, feature split)`` of an SD: ``<any name>_<split>`` as the published tools
    take it (``f128_r18_softmax_class70``, ``myrun_class70``); the size is read from an ``f<d>`` first part."""
    parts = str(sd).split("_")
    if len(parts) < 2 or parts[-1] not in FEATURE_SPLITS or not all(re.fullmatch(r"[A-Za-z0-9.\-]+", p) for p in parts):
        raise UserError(f"--SD '{sd}': expected <name>_<split> with split one of {', '.join(FEATURE_SPLITS)} and a "
                        f"name of letters, digits, '.', '-', '_' (e.g. f128_r18_softmax_class70)")
    return (int(parts[0][1:]) if re.fullmatch(r"f[1-9]\d*", parts[0]) else None), parts[-1]


def scenario_of(sd):
    """``OPclass``/``OPdata``/``EXclass``/``EXdata`` from the SD's feature split."""
    return FEATURE_SPLITS[parse_sd(sd)[1]][0]


def split_rec(folder, split):
    """Rec prefix of training split ``split`` in the data folder ``folder``."""
    require_choice(split, SPLITS, "split")
    return os.path.join(folder, SPLITS[split][0])


def training_rec(folder, split):
    """A config's ``rec`` for training split ``split`` of the data folder ``folder``: the folder itself for
    the full set (it holds train.rec), the split's rec prefix otherwise."""
    return folder if split == "full" else split_rec(folder, split)


def credible_kind(T):
    """File kind of the denoising mask of ratio ``T``: ``credible_ratio_<round(100·T)>``."""
    return f"credible_ratio_{int(round(100 * float(T)))}"


def feature_path(sd, kind, root=None):
    """Path of an SD's ``kind`` file in folder ``root`` (default ``<repo>/feature_save/<scenario>``)."""
    if not isinstance(kind, str) or not KINDS.fullmatch(kind):
        raise UserError(f"unknown feature file kind {kind!r} (feature, label, avg_feature, credible_ratio_<100T>)")
    folder = os.path.abspath(root) if root else os.path.join(FEATURE_ROOT, scenario_of(sd))
    suffix = "_feature" if kind.startswith("credible_ratio_") else ""
    return os.path.join(folder, f"{sd}_{kind}{suffix}.npy")
