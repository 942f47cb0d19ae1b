"""Bad input to every command: exit status 2, one ``error: …`` line on stderr, no partial output.

One test per row of docs/errors.md (``test_error[<case>]``). A case builds its bad input in its own
folder and returns the command line; the command runs as from the shell — in this process through
``runpy`` (``__name__ == "__main__"``, so through ``run_cli``), or, for a few representative cases,
as a real subprocess. Every output a case could write points inside its folder, so "no partial
output" is checked by comparing the folder before and after.
"""
import dataclasses
import fractions
import os
import re
import runpy
import shutil
import sys
from typing import Callable
from unittest import mock

import cv2
import numpy as np
import pytest
import torch

from tests.helpers import ROOT, TINY_MODEL, make_tiny_rec, python, tiny_train_config, write_config

SD = "f16_r18_softmax_class100"          # old features of the whole training set (EXclass)
FEATURE_KINDS = ("feature", "label", "avg_feature", "credible_ratio_90_feature")
MODEL_ARGS = ["-net", "r18", "--width", "8", "--input_size", "32"]
GARBAGE = bytes(range(256)) * 4          # not a RecordIO index, model, image or array
# outputs a failed command may leave: the trainer's log (opened before the config is checked) and
# the IJB meta parse cache (a cache of the inputs)
ALLOWED_LEFTOVERS = re.compile(r"(^|/)training\.log$|(^|/)\.cache(/|$)")
# a tqdm progress bar already on screen when the error happened (it stays above the error line)
PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|.*\| *\d+/\d+ \[")


# ------------------------------------------------------------------------------------ shared inputs
@dataclasses.dataclass
class Shared:
    data: str        # train.rec/.idx/property: 6 classes × 8 images of 32 px
    model: str       # r18 (width 8, input 32) making 16-d embeddings, trained on nothing
    wide: str        # the same backbone making 32-d embeddings
    features: dict   # kind → the SD's good old-feature files of `data`
    ijb: str         # synthetic IJB-C data folder (holds IJBC/)


def _save_model(path, features=16):
    from backbones import get_model

    torch.manual_seed(0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(get_model("r18", num_features=features, width=8, input_size=32).state_dict(), path)
    return str(path)


def write_features(folder, labels, **replace):
    """The SD's 16-d feature files in ``folder`` (clustered features, prototypes, 90 % mask);
    ``replace`` overrides a kind's array (``None`` leaves that file out)."""
    from utils.feature_stats import class_prototypes, credible_mask

    rng = np.random.default_rng(7)
    features = rng.normal(size=(labels.max() + 1, 16))[labels] + 0.5 * rng.normal(size=(len(labels), 16))
    features = features.astype(np.float32)
    arrays = dict(feature=features, label=labels, avg_feature=class_prototypes(features, labels),
                  credible_ratio_90_feature=credible_mask(features, labels, 0.9))
    arrays.update(replace)
    os.makedirs(folder, exist_ok=True)
    paths = {kind: os.path.join(folder, f"{SD}_{kind}.npy") for kind in FEATURE_KINDS}
    for kind, array in arrays.items():
        if array is not None:
            np.save(paths[kind], array, allow_pickle=True)
    return paths


def build_shared(root):
    from tools.synthetic import make_synthetic

    root = str(root)
    make_synthetic.main(["--out", os.path.join(root, "ijb"), "--identities", "2", "--images-per-identity", "1",
                         "--ijb-identities", "4", "--workers", "0"])
    return Shared(data=make_tiny_rec(os.path.join(root, "data"), num_classes=6, per_class=8),
                  model=_save_model(os.path.join(root, "old", "model.pt")),
                  wide=_save_model(os.path.join(root, "wide.pt"), 32),
                  features=write_features(os.path.join(root, "features"), np.repeat(np.arange(6), 8)),
                  ijb=os.path.join(root, "ijb"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return build_shared(tmp_path_factory.mktemp("shared"))


# ------------------------------------------------------------------------------------ the cases
@dataclasses.dataclass
class Case:
    name: str
    command: str            # script, relative to the repository root
    bad_input: str
    fragment: str           # part of the error line that names the problem
    setup: Callable         # (case folder: str, Shared) → argv after the script
    in_subprocess: bool = False
    not_installed: tuple = ()   # modules the command runs without (in this process only)
    env: dict = None            # environment variables set while the command runs


CASES = []


def case(command, bad_input, fragment, in_subprocess=False, not_installed=(), env=None):
    def register(setup):
        CASES.append(Case(setup.__name__, command, bad_input, fragment, setup, in_subprocess, not_installed, env))
        return setup
    return register


def _write(path, data):
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def _a_file(w):
    """A regular file in the case folder, to be used (wrongly) as a folder."""
    return _write(os.path.join(w, "a_file"), b"not a folder\n")


def _copy_data(w, s):
    return shutil.copytree(s.data, os.path.join(w, "data"))


def _offsets(data):
    with open(os.path.join(data, "train.idx")) as handle:
        return [int(line.split("\t")[1]) for line in handle]


# --- training scripts (train_old_arc.py, train_old_softmax.py, BCT_methods/<Method>/train.py)
ARC, SOFTMAX = "train_old_arc.py", "train_old_softmax.py"


def _config(w, rec, **keys):
    return [tiny_train_config(os.path.join(w, "cfg.py"), rec, os.path.join(w, "out"), deterministic=False, **keys)]


def _method_config(w, s, method, **keys):
    """A tiny config beside a base.py that declares the method's keys, with good old-feature files."""
    f = s.features
    good = {"MixBCT": dict(old_embedding=f["feature"], credible_old_feature=f["credible_ratio_90_feature"]),
            "BCT": dict(old_prototype=f["avg_feature"]),
            "UniBCT": dict(old_prototype=f["avg_feature"], old_embedding=f["feature"], refine_epochs=(1,)),
            "NCCL": dict(old_embedding=f["feature"], queue_size=64),
            "L2": dict(old_embedding=f["feature"]),
            "AdvBCT": dict(old_embedding=f["feature"])}[method]
    with open(os.path.join(w, "base.py"), "w") as handle:
        handle.write(f"from BCT_methods.{method}.configs.base import config  # noqa: F401\n")
    return _config(w, s.data, **dict(good, **keys))


def _bad_npy(w, array):
    path = os.path.join(w, "bad.npy")
    np.save(path, array, allow_pickle=True)
    return path


@case(ARC, "config file missing", "config file not found")
def train_missing_config(w, s):
    return [os.path.join(w, "nowhere.py")]


@case(ARC, "config with a syntax error", "line 3: syntax error")
def train_config_syntax_error(w, s):
    return [_write(os.path.join(w, "cfg.py"), b"from easydict import EasyDict as edict\nconfig = edict()\n"
                                              b"config.lr = (0.1\n")]


@case(ARC, "unknown config key (typo `batchsize`)", "unknown key(s) batchsize")
def train_unknown_config_key(w, s):
    return [write_config(os.path.join(w, "cfg.py"), rec=s.data, batchsize=8)]


@case(ARC, "`--set num_epoch=one` (not an integer)", "--set num_epoch='one': expected an integer")
def train_set_not_an_integer(w, s):
    return [*_config(w, s.data), "--set", "num_epoch=one"]


@case(ARC, "unknown backbone (`network = 'r999'`)", "unknown network 'r999'")
def train_unknown_backbone(w, s):
    return _config(w, s.data, network="r999")


@case(ARC, "`.rec` missing (only `train.idx` present)", "training data not found")
def train_missing_rec(w, s):
    data = _copy_data(w, s)
    os.remove(os.path.join(data, "train.rec"))
    return _config(w, data)


@case(ARC, "corrupt `.rec` (a record's magic word overwritten)", "bad magic 0xffffffff")
def train_corrupt_rec(w, s):
    data = _copy_data(w, s)
    with open(os.path.join(data, "train.rec"), "r+b") as handle:
        handle.seek(_offsets(data)[5])
        handle.write(b"\xff" * 4)
    return _config(w, data)


@case(ARC, "truncated `.rec` (second half cut off)", "truncated .rec or wrong .idx")
def train_truncated_rec(w, s):
    data = _copy_data(w, s)
    path = os.path.join(data, "train.rec")
    os.truncate(path, os.path.getsize(path) // 2)
    return _config(w, data)


@case(ARC, "truncated `.idx` (cut inside a line)", "expected 'key<TAB>offset' (two integers)")
def train_truncated_idx(w, s):
    data = _copy_data(w, s)
    path = os.path.join(data, "train.idx")
    with open(path, "rb") as handle:
        text = handle.read()
    _write(path, text[:text.index(b"\t", len(text) // 2) + 1])
    return _config(w, data)


@case(ARC, "garbled `.idx` (binary junk)", "line 1: expected 'key<TAB>offset'")
def train_garbled_idx(w, s):
    data = _copy_data(w, s)
    _write(os.path.join(data, "train.idx"), GARBAGE)
    return _config(w, data)


@case(ARC, "empty `.idx` (no images)", "the dataset holds no images")
def train_empty_dataset(w, s):
    data = _copy_data(w, s)
    _write(os.path.join(data, "train.idx"), b"")
    return _config(w, data)


@case(ARC, "label ≥ num_classes (`property` says 4 classes, labels go to 5)", "has label 4, outside 0..3",
      in_subprocess=True)
def train_label_beyond_property(w, s):
    data = _copy_data(w, s)
    _write(os.path.join(data, "property"), b"4,32,32\n")
    return _config(w, data)


@case(SOFTMAX, "label ≥ num_classes (no `property`, config `num_classes = 5`)",
      "has label 5, outside 0..4 (num_classes = 5 from config")
def softmax_label_beyond_config(w, s):
    data = _copy_data(w, s)
    os.remove(os.path.join(data, "property"))
    return _config(w, data, num_classes=5)


@case(ARC, "config `num_classes` below the data's `property`", "num_classes = 4 but")
def train_num_classes_mismatch(w, s):
    return _config(w, s.data, num_classes=4)


@case(ARC, "fewer images than one batch", "fewer than one global batch")
def train_batch_larger_than_data(w, s):
    return _config(w, s.data, batch_size=64)


@case(ARC, "unsupported optimizer", "optimizer 'adam' is not supported")
def train_unknown_optimizer(w, s):
    return _config(w, s.data, optimizer="adam")


@case(ARC, "output folder cannot be created (its parent is a regular file)", "cannot create output folder")
def train_output_under_a_file(w, s):
    return [tiny_train_config(os.path.join(w, "cfg.py"), s.data, os.path.join(_a_file(w), "out"),
                              deterministic=False)]


@case(ARC, "an explicit GPU index with several processes", "would put all 2 processes on one GPU",
      env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
def train_gpu_index_with_several_processes(w, s):
    return _config(w, s.data, device="cuda:0")


@case(ARC, "resume with another process count", "saved by a run of 2 processes")
def train_resume_other_process_count(w, s):
    args = _config(w, s.data, max_steps=1, save_every_steps=1)
    assert python(ARC, *args).returncode == 0
    folder = os.path.join(w, "out", "checkpoints")
    path = os.path.join(folder, sorted(os.listdir(folder))[-1])
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, world_size=2), path)
    os.remove(os.path.join(w, "out", "model.pt"))
    return args + ["--resume"]


@case(ARC, "`--resume` that finds no checkpoint", "--resume: no checkpoint under")
def train_resume_without_checkpoint(w, s):
    return _config(w, s.data) + ["--resume"]


@case("BCT_methods/MixBCT/train.py", "old features: row count ≠ training images",
      "47 rows but the training set has 48 images")
def mixbct_feature_rows(w, s):
    return _method_config(w, s, "MixBCT", old_embedding=_bad_npy(w, np.zeros((47, 16), np.float32)))


@case("BCT_methods/L2/train.py", "old features: dimension ≠ `embedding_size`",
      "dimension 8 but embedding_size is 16")
def l2_feature_dimension(w, s):
    return _method_config(w, s, "L2", old_embedding=_bad_npy(w, np.zeros((48, 8), np.float32)))


@case("BCT_methods/L2/train.py", "old features: a row with NaN",
      "row 5 contains NaN or inf")
def l2_feature_nan_row(w, s):
    features = np.load(s.features["feature"])
    features[5, 3] = np.nan
    return _method_config(w, s, "L2", old_embedding=_bad_npy(w, features))


@case("BCT_methods/MixBCT/train.py", "denoising mask with no credible sample", "marks no sample as credible")
def mixbct_mask_without_credible(w, s):
    return _method_config(w, s, "MixBCT", credible_old_feature=_bad_npy(w, np.zeros(48, np.uint8)))


@case("BCT_methods/MixBCT/train.py", "denoising mask with values other than 0/1", "expected only 0/1 values")
def mixbct_mask_values(w, s):
    return _method_config(w, s, "MixBCT", credible_old_feature=_bad_npy(w, np.full(48, 2, np.uint8)))


@case("BCT_methods/BCT/train.py", "prototype count ≠ num_classes",
      "5 prototypes but the training set has 6 classes")
def bct_prototype_count(w, s):
    return _method_config(w, s, "BCT", old_prototype=_bad_npy(w, np.ones((5, 16), np.float32)))


@case("BCT_methods/UniBCT/train.py", "prototypes with NaN rows", "prototypes contain NaN or inf")
def unibct_prototype_nan(w, s):
    prototypes = np.ones((6, 16), np.float32)
    prototypes[2] = np.nan
    return _method_config(w, s, "UniBCT", old_prototype=_bad_npy(w, prototypes))


@case("BCT_methods/NCCL/train.py", "old-feature `.npy` holding pickled Python objects", "Python objects")
def nccl_pickled_features(w, s):
    return _method_config(w, s, "NCCL", old_embedding=_bad_npy(w, np.array([{"a": 1}] * 48, dtype=object)))


@case("BCT_methods/AdvBCT/train.py", "old-feature file missing", "file not found")
def advbct_missing_features(w, s):
    return _method_config(w, s, "AdvBCT", old_embedding=os.path.join(w, "missing.npy"))


@case("BCT_methods/MixBCT/train.py", "`--set mix_ratio=half` (not a number)", "--set mix_ratio='half': expected a number")
def mixbct_set_not_a_number(w, s):
    return [*_method_config(w, s, "MixBCT"), "--set", "mix_ratio=half"]


@case("BCT_methods/L2/train.py", "method config outside its folder (method keys not declared/set)",
      "L2 needs old_embedding")
def l2_config_without_method_keys(w, s):
    return _config(w, s.data)


# --- tools/split_dataset/split_dataset_ms1mv3.py
SPLIT = "tools/split_dataset/split_dataset_ms1mv3.py"


def _split(w, root, *extra):
    return ["--root", root, "--out", os.path.join(w, "out"), *extra]


@case(SPLIT, "split ratio 0.5 (both parts would be named 50)", "--ratio must be in (0, 1)")
def split_ratio_half(w, s):
    return _split(w, s.data, "--ratio", "0.5")


@case(SPLIT, "split ratio outside (0, 1)", "got 1.5")
def split_ratio_above_one(w, s):
    return _split(w, s.data, "--ratio", "1.5")


@case(SPLIT, "ratio that leaves a split empty (0.05 of 6 classes)", "leaves train_part_5_class empty")
def split_empty_part(w, s):
    return _split(w, s.data, "--ratio", "0.05")


@case(SPLIT, "`--root` is not a folder", "is not a folder")
def split_root_missing(w, s):
    return _split(w, os.path.join(w, "nowhere"))


@case(SPLIT, "`--root` without `train.rec`/`train.idx`", "training data not found")
def split_root_without_rec(w, s):
    os.makedirs(os.path.join(w, "empty"))
    return _split(w, os.path.join(w, "empty"))


@case(SPLIT, "labels beyond the `property` class count", "outside the 4 classes")
def split_labels_beyond_property(w, s):
    data = _copy_data(w, s)
    _write(os.path.join(data, "property"), b"4,32,32\n")
    return _split(w, data)


@case(SPLIT, "`--out` cannot be created (its parent is a regular file)", "cannot create output folder")
def split_out_under_a_file(w, s):
    return ["--root", s.data, "--out", os.path.join(_a_file(w), "out")]


# --- tools/get_feature/get_feature.py
GET = "tools/get_feature/get_feature.py"


def _get(w, s, model=None, sd=SD, **keys):
    """get_feature.py argv for an old config whose model.pt is ``model`` (bytes, a state, None = missing)."""
    folder = os.path.join(w, "old")
    os.makedirs(folder)
    path = os.path.join(folder, "model.pt")
    if isinstance(model, bytes):
        _write(path, model)
    elif model is not None:
        torch.save(model, path)
    keys = dict(dict(TINY_MODEL, rec=s.data, output=folder, num_workers=0, fp16=False), **keys)
    cfg = write_config(os.path.join(w, "old_cfg.py"), **keys)
    return [cfg, "--SD", sd, "--output", os.path.join(w, "features")]


def _state(s):
    return torch.load(s.model, weights_only=True)


@case(GET, "old model file missing", "old model not found")
def feature_model_missing(w, s):
    return _get(w, s)


@case(GET, "old model file corrupt (its zip directory overwritten)", "corrupt or truncated file")
def feature_model_corrupt(w, s):
    with open(s.model, "rb") as handle:
        data = handle.read()
    return _get(w, s, data[:-100] + b"\xff" * 100)


@case(GET, "old model file truncated", "corrupt or truncated file")
def feature_model_truncated(w, s):
    with open(s.model, "rb") as handle:
        data = handle.read()
    return _get(w, s, data[:len(data) // 2])


@case(GET, "old model from a different backbone (MobileFaceNet weights, config r18)",
      "was saved from a different backbone than r18", in_subprocess=True)
def feature_model_other_backbone(w, s):
    from backbones import get_model

    return _get(w, s, get_model("mbf", num_features=16, width=8, input_size=32).state_dict())


@case(GET, "old model saved with another width than the config's", "does not match r18 with width=16")
def feature_model_other_width(w, s):
    return _get(w, s, _state(s), network_width=16)


@case(GET, "old model file carrying pickled objects", "contains pickled Python objects")
def feature_model_pickled(w, s):
    return _get(w, s, dict(_state(s), extra=fractions.Fraction(1, 3)))


@case(GET, "`--SD` dimension ≠ the model's embedding size", "makes 16-d embeddings but --SD")
def feature_sd_dimension(w, s):
    return _get(w, s, _state(s), sd="f32_r18_softmax_class100")


@case(GET, "`--SD` with an unknown split suffix", "--SD 'f16_r18_softmax_class50'")
def feature_sd_unknown_split(w, s):
    return _get(w, s, _state(s), sd="f16_r18_softmax_class50")


@case(GET, "split data missing (no `train_part_70_class` beside `rec`)", "training data not found")
def feature_split_missing(w, s):
    return _get(w, s, _state(s), sd="f16_r18_softmax_class70")


@case(GET, "image listed in the `.rec` cannot be decoded", "cannot be decoded")
def feature_undecodable_image(w, s):
    data = _copy_data(w, s)
    with open(os.path.join(data, "train.rec"), "r+b") as handle:
        handle.seek(_offsets(data)[5] + 8 + 24)
        handle.write(b"\0" * 64)
    return _get(w, s, _state(s), rec=data)


@case(GET, "old model whose embeddings are NaN (a NaN weight)", "row 0 contains NaN or inf")
def feature_model_nan(w, s):
    state = _state(s)
    state["features.weight"] = torch.full_like(state["features.weight"], float("nan"))
    return _get(w, s, state)


@case(GET, "`--chunk_size 0` (images per resume chunk)", "--chunk_size (rows per saved chunk) must be >= 1, got 0")
def feature_chunk_size_zero(w, s):
    return _get(w, s, _state(s)) + ["--chunk_size", "0"]


# --- tools/get_feature/get_avg_feature.py and denoise_credible.py
AVG, DENOISE = "tools/get_feature/get_avg_feature.py", "tools/get_feature/denoise_credible.py"
LABELS = np.repeat(np.arange(6), 8)


def _features(w, *extra, **replace):
    folder = os.path.join(w, "features")
    write_features(folder, LABELS, avg_feature=None, credible_ratio_90_feature=None, **replace)
    return ["--SD", SD, "--output", folder, *extra]


@case(AVG, "features/labels length mismatch", "has 48 rows but")
def avg_length_mismatch(w, s):
    return _features(w, label=LABELS[:47])


@case(AVG, "feature file with a NaN row", "row 7 contains NaN or inf")
def avg_nan_row(w, s):
    features = np.ones((48, 16), np.float32)
    features[7, 3] = np.nan
    return _features(w, feature=features)


@case(AVG, "a class without images (labels skip class 3)", "(first: class 3)")
def avg_class_without_images(w, s):
    return _features(w, label=np.where(LABELS == 3, 4, LABELS))


@case(AVG, "`--num_classes` smaller than the labels", "has label 4 but num_classes is 4")
def avg_num_classes_too_small(w, s):
    return _features(w, "--num_classes", "4")


@case(AVG, "feature file is not N×d (1-D)", "expected an N×d float array")
def avg_feature_not_2d(w, s):
    return _features(w, feature=np.ones(48, np.float32))


@case(AVG, "feature files missing", "feature file not found")
def avg_features_missing(w, s):
    return ["--SD", SD, "--output", os.path.join(w, "features")]


@case(DENOISE, "`--T` above 1", "--T must be in [0, 1], got 1.5")
def denoise_T_above_one(w, s):
    return _features(w, "--T", "1.5")


@case(DENOISE, "`--T` below 0", "--T must be in [0, 1], got -0.1")
def denoise_T_below_zero(w, s):
    return _features(w, "--T=-0.1")


@case(DENOISE, "float labels", "expected N integer labels")
def denoise_float_labels(w, s):
    return _features(w, label=LABELS.astype(np.float32))


@case(DENOISE, "truncated feature file", "cannot read")
def denoise_truncated_features(w, s):
    argv = _features(w)
    path = os.path.join(w, "features", f"{SD}_feature.npy")
    os.truncate(path, os.path.getsize(path) // 2)
    return argv


@case(DENOISE, "label file holding pickled Python objects", "contains pickled Python objects")
def denoise_pickled_labels(w, s):
    return _features(w, label=np.array([fractions.Fraction(1, 3)] * 48, dtype=object))


# --- tools/ijbc_eval/ijbc_eval.py
IJB = "tools/ijbc_eval/ijbc_eval.py"


def _ijb_data(w, s):
    """A private copy of the IJB-C data (for cases that damage it)."""
    shutil.copytree(os.path.join(s.ijb, "IJBC"), os.path.join(w, "ijb", "IJBC"),
                    ignore=shutil.ignore_patterns(".cache"))
    return os.path.join(w, "ijb")


def _meta(data, name):
    return os.path.join(data, "IJBC", "meta", f"ijbc_{name}")


def _eval(w, data, *extra, model=None):
    model = ["-m", model] if model else []
    return [*model, *MODEL_ARGS, "-d", data, "--num_workers", "0", "--device", "cpu",
            "-R", os.path.join(w, "results", "r.npz"), *extra]


@case(IJB, "`--bootstrap -1` (subject resamples of the intervals)", "--bootstrap must be 0 (off)")
def ijb_negative_bootstrap(w, s):
    return _eval(w, s.ijb, "--bootstrap", "-1", model=s.model)


@case(IJB, "IJB meta file missing (`ijbc_template_pair_label.txt`)", "meta file not found")
def ijb_missing_meta_file(w, s):
    data = _ijb_data(w, s)
    os.remove(_meta(data, "template_pair_label.txt"))
    return _eval(w, data, model=s.model)


@case(IJB, "landmark row with 11 instead of 12 fields", "line 3: expected 12 fields, found 11")
def ijb_landmark_fields(w, s):
    data = _ijb_data(w, s)
    path = _meta(data, "name_5pts_score.txt")
    with open(path) as handle:
        lines = handle.read().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]
    _write(path, ("\n".join(lines) + "\n").encode())
    return _eval(w, data, model=s.model)


@case(IJB, "pair naming an unknown template", "unknown template 999999")
def ijb_unknown_template(w, s):
    data = _ijb_data(w, s)
    with open(_meta(data, "template_pair_label.txt"), "a") as handle:
        handle.write("999999 1 0\n")
    return _eval(w, data, model=s.model)


@case(IJB, "1:N gallery CSV naming an unknown template", "unknown template 424242")
def ijb_gallery_unknown_template(w, s):
    data = _ijb_data(w, s)
    with open(_meta(data, "1N_gallery_G1.csv"), "a") as handle:
        handle.write("424242,1,img/x.jpg,1,0,0,10,10\n")
    return _eval(w, data, "-N", model=s.model)


@case(IJB, "image listed but absent from `loose_crop/`", "line 2: image")
def ijb_missing_image(w, s):
    data = _ijb_data(w, s)
    with open(_meta(data, "face_tid_mid.txt")) as handle:
        name = handle.read().splitlines()[1].split()[0]
    os.remove(os.path.join(data, "IJBC", "loose_crop", name))
    return _eval(w, data, model=s.model)


@case(IJB, "image listed but unreadable (not an image)", "cannot read image")
def ijb_unreadable_image(w, s):
    data = _ijb_data(w, s)
    with open(_meta(data, "face_tid_mid.txt")) as handle:
        name = handle.read().splitlines()[2].split()[0]
    _write(os.path.join(data, "IJBC", "loose_crop", name), GARBAGE)
    return _eval(w, data, model=s.model)


@case(IJB, "`--restore_embs` file of the wrong length", "rows but the image list has")
def ijb_embeddings_wrong_length(w, s):
    path = os.path.join(w, "short.npz")
    np.savez(path, embs=np.zeros((3, 16), np.float32), embs_f=np.zeros((3, 16), np.float32))
    return _eval(w, s.ijb, "--restore_embs", path)


@case(IJB, "`--restore_embs` file holding pickled objects", "contains pickled Python objects")
def ijb_embeddings_pickled(w, s):
    path = os.path.join(w, "pickled.npz")
    np.savez(path, embs=np.array([fractions.Fraction(1, 3)], dtype=object), embs_f=np.zeros((1, 16)))
    return _eval(w, s.ijb, "--restore_embs", path)


@case(IJB, "`--restore_embs` file that is a `.npy`, not an `.npz`", "expected an .npz result")
def ijb_embeddings_not_npz(w, s):
    path = os.path.join(w, "embs.npy")
    np.save(path, np.zeros((3, 16), np.float32))
    return _eval(w, s.ijb, "--restore_embs", path)


@case(IJB, "cross-test with old/new embedding sizes that differ", "cross-test needs equal embedding sizes",
      in_subprocess=True)
def ijb_cross_test_size_mismatch(w, s):
    return _eval(w, s.ijb, "-m_old", s.wide, model=s.model)


@case(IJB, "model file missing", "model file not found")
def ijb_model_missing(w, s):
    return _eval(w, s.ijb, model=os.path.join(w, "missing.pt"))


@case(IJB, "model from a different backbone than `-net`",
      "different backbone than mbf (missing keys features.layers.3.weight); the file holds an iresnet r18 of width 8")
def ijb_model_other_backbone(w, s):
    return _eval(w, s.ijb, "-net", "mbf", model=s.model)


@case(IJB, "ONNX model file corrupt", "cannot load ONNX model")
def ijb_corrupt_onnx(w, s):
    return _eval(w, s.ijb, model=_write(os.path.join(w, "model.onnx"), GARBAGE))


@case(IJB, "ONNX model without onnxruntime installed", "needs onnxruntime (not installed): pip install onnxruntime",
      not_installed=("onnxruntime",))
def ijb_onnx_without_onnxruntime(w, s):
    return _eval(w, s.ijb, model=_write(os.path.join(w, "model.onnx"), GARBAGE))


@case(IJB, "unknown subset", "unknown subset 'IJBX'")
def ijb_unknown_subset(w, s):
    return _eval(w, s.ijb, "-s", "IJBX", model=s.model)


@case(IJB, "data folder without `IJBC/`", "is not a folder")
def ijb_data_missing(w, s):
    return _eval(w, os.path.join(w, "nowhere"), model=s.model)


@case(IJB, "`-R` not ending in `.npz`", "must be a path ending in .npz")
def ijb_result_not_npz(w, s):
    return _eval(w, s.ijb, "-R", os.path.join(w, "results", "r.json"), model=s.model)


# --- tools/export_onnx.py
EXPORT = "tools/export_onnx.py"


def _export(w, model, *extra):
    return [model, os.path.join(w, "out", "model.onnx"), *MODEL_ARGS, *extra]


@case(EXPORT, "unknown backbone", "unknown network 'r999'")
def export_unknown_network(w, s):
    return _export(w, s.model, "-net", "r999")


@case(EXPORT, "model file missing", "model/checkpoint file not found")
def export_model_missing(w, s):
    return _export(w, os.path.join(w, "missing.pt"))


@case(EXPORT, "model from a different backbone", "different backbone than vit_t")
def export_model_other_backbone(w, s):
    return _export(w, s.model, "-net", "vit_t")


@case(EXPORT, "output not ending in `.onnx`", "output must end in .onnx")
def export_output_not_onnx(w, s):
    return [s.model, os.path.join(w, "out", "model.pt"), *MODEL_ARGS]


@case(EXPORT, "the `onnx` package not installed", "needs the onnx package (not installed): pip install onnx",
      not_installed=("onnx",))
def export_without_onnx(w, s):
    return _export(w, s.model)


# --- tools/synthetic/make_synthetic.py
SYNTHETIC = "tools/synthetic/make_synthetic.py"


def _synthetic(out, *extra):
    return ["--out", out, "--identities", "2", "--images-per-identity", "1", "--ijb-identities", "2",
            "--workers", "0", *extra]


@case(SYNTHETIC, "`--out` exists and is not empty (no `--overwrite`)", "folder exists and is not empty")
def synthetic_out_not_empty(w, s):
    os.makedirs(os.path.join(w, "out"))
    _write(os.path.join(w, "out", "keep.txt"), b"user data\n")
    return _synthetic(os.path.join(w, "out"))


@case(SYNTHETIC, "`--out` is a regular file", "exists and is not a folder")
def synthetic_out_is_a_file(w, s):
    return _synthetic(_a_file(w))


@case(SYNTHETIC, "`--out` cannot be created (its parent is a regular file)", "cannot write to")
def synthetic_out_under_a_file(w, s):
    return _synthetic(os.path.join(_a_file(w), "out"))


@case(SYNTHETIC, "fewer than 2 identities", "--identities must be at least 2")
def synthetic_one_identity(w, s):
    return _synthetic(os.path.join(w, "out"), "--identities", "1")


# --- tools/compat_eval/compat_eval.py
COMPAT = "tools/compat_eval/compat_eval.py"


def _faces(w, identities=2, per_identity=2, size=32):
    """An image folder ``<case>/faces/id<k>/<n>.png`` of random crops."""
    rng = np.random.default_rng(0)
    root = os.path.join(w, "faces")
    for k in range(identities):
        os.makedirs(os.path.join(root, f"id{k}"))
        for n in range(per_identity):
            cv2.imwrite(os.path.join(root, f"id{k}", f"{n}.png"), rng.integers(0, 255, (size, size, 3), np.uint8))
    return root


def _compat(w, s, *data, models=None, extra=()):
    models = models or [s.model, s.model]
    return [*data, "--models", *models, "--networks", "r18", "--widths", "8", "--input_sizes", "32",
            "--image_size", "32", "--num_workers", "0", "--bootstrap", "5", "-R", os.path.join(w, "out", "compat"),
            *extra]


@case(COMPAT, "empty identity folder", "identity folder holds no images")
def compat_empty_identity_folder(w, s):
    root = _faces(w)
    os.makedirs(os.path.join(root, "id9"))
    return _compat(w, s, "--data", root)


@case(COMPAT, "unreadable image in the folder", "cannot read image")
def compat_unreadable_image(w, s):
    root = _faces(w)
    _write(os.path.join(root, "id1", "1.png"), GARBAGE)
    return _compat(w, s, "--data", root)


@case(COMPAT, "a single identity", "compatibility testing needs at least 2 identities")
def compat_one_identity(w, s):
    return _compat(w, s, "--data", _faces(w, identities=1))


@case(COMPAT, "image of the wrong size (no `--resize`)", "pass --resize")
def compat_wrong_image_size(w, s):
    root = _faces(w)
    cv2.imwrite(os.path.join(root, "id0", "1.png"), np.zeros((30, 32, 3), np.uint8))
    return _compat(w, s, "--data", root)


@case(COMPAT, "`.rec` of 32 px crops where 112 px are expected", "is 32×32 pixels, expected 112×112")
def compat_rec_wrong_size(w, s):
    return _compat(w, s, "--rec", s.data, extra=["--image_size", "112"])


@case(COMPAT, "`--networks` count ≠ `--models` count", "--networks: give one value per model (2)")
def compat_networks_count(w, s):
    return _compat(w, s, "--rec", s.data, extra=["--networks", "r18", "r18", "r18"])


@case(COMPAT, "generations with different embedding sizes", "compatibility needs equal sizes")
def compat_embedding_sizes(w, s):
    return _compat(w, s, "--rec", s.data, models=[s.model, s.wide])


@case(COMPAT, "`--restore_embs` file not saved with `-E`", "not a compat_eval result saved with -E")
def compat_restore_other_file(w, s):
    path = os.path.join(w, "embs.npz")
    np.savez(path, embs=np.zeros((3, 16), np.float32))
    return ["--restore_embs", path, "-R", os.path.join(w, "out", "compat")]


@case(COMPAT, "`--backfill_order` file naming an unknown identity", "line 2: unknown identity 'nobody'")
def compat_backfill_order_unknown(w, s):
    rng = np.random.default_rng(0)
    embs = {f"{kind}{g}": rng.normal(size=(6, 16)).astype(np.float32) for kind in ("embs", "embs_f") for g in (0, 1)}
    path = os.path.join(w, "embs.npz")
    np.savez(path, generations=np.array(["v1", "v2"]), labels=np.repeat(np.arange(3), 2), **embs)
    _write(os.path.join(w, "order.txt"), b"2\nnobody\n")
    return ["--restore_embs", path, "--backfill", "--backfill_order", os.path.join(w, "order.txt"),
            "-R", os.path.join(w, "out", "compat")]


@case(COMPAT, "unknown `--metric` (checked before any image is embedded)", "--metric TAR@FAR=1e-9: expected one of")
def compat_unknown_metric(w, s):
    return _compat(w, s, "--data", _faces(w), extra=["--metric", "TAR@FAR=1e-9"])


@case(COMPAT, "`--transform` of another embedding size (16-d → 8-d, the models make 16-d; checked when the models "
      "are loaded, before any image is embedded)",
      "maps 16-d embeddings to 8-d ones, but the generations make 16-d embeddings")
def compat_transform_wrong_size(w, s):
    from tools.transform import transforms

    transform = transforms.save(transforms.build("linear", 16, 8), os.path.join(w, "h.pt"))
    return _compat(w, s, "--data", _faces(w), extra=["--transform", transform])


# --- own data, deployed models, gallery transforms
@case("tools/pack_rec.py", "unreadable image in the folder", "cannot read image")
def pack_unreadable_image(w, s):
    root = _faces(w)
    _write(os.path.join(root, "id1", "1.png"), GARBAGE)
    return [root, os.path.join(w, "out", "train")]


def _damaged_jpeg(w, cut):
    root = _faces(w)
    data = bytearray(cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))[1])
    data[len(data) // 2:len(data) // 2 + 20] = b"\xff" * 20
    _write(os.path.join(root, "id1", "1.jpg"), bytes(data[:len(data) // 2] if cut else data))
    return [root, os.path.join(w, "out", "train")]


@case("tools/pack_rec.py", "damaged JPEG that libjpeg decodes with a complaint (its message is not printed)",
      "Corrupt JPEG data: premature end of data segment (damaged file", in_subprocess=True)
def pack_damaged_jpeg(w, s):
    return _damaged_jpeg(w, cut=False)


@case("tools/pack_rec.py", "JPEG cut short", "truncated JPEG file (no end-of-image marker)")
def pack_truncated_jpeg(w, s):
    return _damaged_jpeg(w, cut=True)


@case("tools/pack_rec.py", "crops of different sizes", "a set holds crops of one size")
def pack_mixed_sizes(w, s):
    root = _faces(w)
    cv2.imwrite(os.path.join(root, "id1", "0.png"), np.zeros((30, 32, 3), np.uint8))
    return [root, os.path.join(w, "out", "train")]


@case(GET, "deployed ONNX model of another input size", "pass the matching --input_size")
def get_feature_onnx_input_size(w, s):
    from tools import export_onnx

    onnx_file = os.path.join(w, "old.onnx")
    export_onnx.export(s.model, "r18", onnx_file, width=8, input_size=32)
    return ["--model", onnx_file, "--input_size", "112", "--dataset", s.data, "--SD", SD,
            "--output", os.path.join(w, "features"), "--cache_dir", os.path.join(w, "cache")]


@case(GET, "`--dataset` is an image folder, not a packed set", "is an image folder (ROOT/<identity>/<image>), "
      "not a RecordIO set; pack it first (python tools/pack_rec.py")
def get_feature_image_folder(w, s):
    return [*_get(w, s, _state(s)), "--dataset", _faces(w)]


@case(GET, "unknown `--preprocess` item", "unknown item 'grey'")
def get_feature_bad_preprocess(w, s):
    return ["--model", s.model, "--preprocess", "mean=127.5,grey", "--dataset", s.data, "--SD", SD,
            "--output", os.path.join(w, "features")]


@case("tools/transform/fit_transform.py", "old and new features of different row counts",
      "the two models' features of the same images are needed")
def transform_row_counts(w, s):
    old, new = os.path.join(w, "old_feature.npy"), os.path.join(w, "new_feature.npy")
    np.save(old, np.ones((10, 4), np.float32))
    np.save(new, np.ones((9, 4), np.float32))
    return ["--old", old, "--new", new, "--kind", "linear", "-o", os.path.join(w, "out", "h.pt")]


@case("tools/transform/apply_transform.py", "a file that is not a transform", "not a gallery transform")
def transform_not_a_transform(w, s):
    np.save(os.path.join(w, "gallery.npy"), np.ones((10, 16), np.float32))
    return [s.model, os.path.join(w, "gallery.npy"), os.path.join(w, "out", "mapped.npy")]


@case(IJB, "`--transform` without an old model", "--transform maps the old model's gallery")
def ijb_transform_without_old_model(w, s):
    return ["-m", s.model, *MODEL_ARGS, "-d", s.ijb, "--transform", os.path.join(w, "h.pt")]


# --- tools/run_demo.py
@case("tools/run_demo.py", "unknown `--methods` entry", "unknown method 'Foo'")
def demo_unknown_method(w, s):
    return ["--quick", "--methods", "MixBCT,Foo", "--out", os.path.join(w, "demo"), "--data", os.path.join(w, "data")]


@case("tools/run_demo.py", "`--generation_method` not among the trained `--methods`",
      "--generation_method MixBCT: expected one of the trained --methods")
def demo_generation_method_not_trained(w, s):
    return ["--quick", "--methods", "L2", "--generations", "3", "--generation_method", "MixBCT",
            "--out", os.path.join(w, "demo"), "--data", os.path.join(w, "data")]


@case("tools/run_demo.py", "`--seeds 0`", "--seeds must be at least 1")
def demo_zero_seeds(w, s):
    return ["--quick", "--seeds", "0", "--out", os.path.join(w, "demo"), "--data", os.path.join(w, "data")]


# ------------------------------------------------------------------------------------ running
def run_in_process(script, argv, not_installed=()):
    """``python script argv…`` in this process (``runpy`` as ``__main__``); returns the exit status.

    Modules in ``not_installed`` cannot be imported while it runs (as if they were not installed).
    """
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_modules = {name: sys.modules.get(name) for name in not_installed}
    sys.argv = [script, *argv]
    sys.modules.update(dict.fromkeys(not_installed))
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return 0


def run_case(item, folder, shared_inputs, capsys=None):
    """Build the case's input in ``folder``, run its command; ``(status, stderr, new entries in folder)``."""
    argv = item.setup(folder, shared_inputs)
    before = _entries(folder)
    if item.in_subprocess:
        proc = python(item.command, *argv, env=item.env)
        status, stderr = proc.returncode, proc.stderr
    else:
        if capsys:
            capsys.readouterr()
        with mock.patch.dict(os.environ, item.env or {}):
            status = run_in_process(item.command, argv, item.not_installed)
        stderr = capsys.readouterr().err if capsys else ""
    return status, stderr, sorted(_entries(folder) - before)


def _entries(folder):
    found = set()
    for top, dirs, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(top, name), folder) for name in dirs + files)
    return found


def message_lines(stderr):
    """The lines a terminal shows on stderr, without tqdm progress bars."""
    shown = [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]
    return [line for line in shown if line.strip() and not PROGRESS_BAR.match(line)]


def leftovers(folder, new_entries):
    """New entries that are partial outputs: files other than logs/caches, and temporary files/folders."""
    return [p for p in new_entries if not ALLOWED_LEFTOVERS.search(p)
            and (os.path.isfile(os.path.join(folder, p)) or os.path.basename(p).startswith(".tmp"))]


@pytest.fixture
def one_thread():
    """One intra-op thread, as the subprocesses run (OMP_NUM_THREADS=1): faster on a few busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("item", CASES, ids=[c.name for c in CASES])
def test_error(item, shared, tmp_path, capsys, one_thread):
    folder = str(tmp_path)
    status, stderr, new_entries = run_case(item, folder, shared, capsys)
    lines = message_lines(stderr)
    assert status == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    assert item.fragment in lines[0], lines[0]
    assert not leftovers(folder, new_entries), new_entries


@pytest.mark.parametrize("name", ["train_set_not_an_integer", "mixbct_set_not_a_number"])
def test_bad_set_value_writes_nothing(name, shared, tmp_path, capsys, one_thread):
    """A ``--set`` value of the wrong type stops before the trainer opens its training.log."""
    item = next(c for c in CASES if c.name == name)
    status, _, new_entries = run_case(item, str(tmp_path), shared, capsys)
    assert status == 2 and not new_entries, new_entries


def documented_messages():
    """``{case: message}`` from the rows of docs/errors.md (message in double backticks, link to the test)."""
    with open(os.path.join(ROOT, "docs", "errors.md"), encoding="utf-8") as handle:
        text = handle.read()
    return {name: message for message, name in
            re.findall(r"^\|[^\n]*?`` (error[^\n]*?) ``[^\n]*?test_error\[(\w+)\]", text, re.M)}


def test_every_case_is_documented_with_its_message():
    rows = documented_messages()
    assert sorted(rows) == sorted(c.name for c in CASES)
    for item in CASES:
        assert item.fragment in rows[item.name].replace("\\|", "|"), item.name
