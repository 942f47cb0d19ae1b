"""The old-feature files of steps 2–4: their names, where they live, loading and checking them.

``SD`` ("scenario detail") names one set of old features, ``<name>_<split>``, by convention
``f<d>_<old backbone>_<old loss>_<split>``
(e.g. ``f128_r18_softmax_class70``). Files live in ``feature_save/<scenario>/`` under the repository
root (or a folder the user gives), named ``<SD>_<kind>.npy``:

=========================  ============================  ======================================
kind                       file                          content
=========================  ============================  ======================================
``feature``                ``<SD>_feature.npy``          N×d float32 raw old embeddings, dataset order
``label``                  ``<SD>_label.npy``            N int64 labels, dataset order
``avg_feature``            ``<SD>_avg_feature.npy``      C×d float32 class prototypes, row c = class c
``credible_ratio_<100T>``  ``<SD>_credible_ratio_<100T>_feature.npy``  N uint8 0/1 denoising mask
=========================  ============================  ======================================

Steps 3 and 4 read them with :func:`load_features`; the BCT methods read them while training
through :class:`OldFeatures`, :class:`CredibleMask` and :func:`load_prototypes`. Per-image files
are memory-mapped and read per batch, so no rank holds a whole 3.6M×512 file. Everything is
validated before training starts: a missing file, a row count that differs from the training set,
a dimension that differs from ``embedding_size`` or a mask without any credible sample stops the
run with one :class:`~utils.errors.UserError` line.

torch is imported only by the functions that make tensors, so steps 3 and 4 start fast.
"""
import os

import numpy as np

from utils.errors import UserError, require
from utils.feature_stats import check_finite_rows
from utils.io import safe_np_load
from utils.scenarios import FEATURE_SPLITS, feature_path, parse_sd, split_rec


def sd_rec(rec, sd):
    """The rec prefix of the split an SD is extracted on, beside ``rec`` (a prefix or a folder holding
    train.rec): ``class70`` → ``<dir>/train_part_70_class`` …; ``class100``/``data100`` → ``<dir>/train``."""
    if not rec:
        raise UserError("the config sets no `rec`; give the data with --dataset")
    folder = rec if os.path.isdir(rec) else os.path.dirname(rec)
    return split_rec(folder, FEATURE_SPLITS[parse_sd(sd)[1]][1])


def load_features(sd, root=None):
    """The SD's features (read-only memory map) and labels, checked to be N×d float and N integers."""
    feature_file, label_file = feature_path(sd, "feature", root), feature_path(sd, "label", root)
    for path in (feature_file, label_file):
        if not os.path.isfile(path):
            raise UserError(f"feature file not found: {path} (extract it first: tools/get_feature/get_feature.py "
                            f"<old config> --SD {sd})")
    features = safe_np_load(feature_file, mmap_mode="r")
    labels = safe_np_load(label_file)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise UserError(f"{feature_file}: expected an N×d float array, got {features.dtype} of shape {features.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{label_file}: expected N integer labels, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(features):
        raise UserError(f"{feature_file} has {len(features)} rows but {label_file} has {len(labels)} labels")
    return features, labels


def add_sd_args(parser):
    """``--SD`` (required) and ``--output`` (folder of the feature files)."""
    parser.add_argument("--SD", required=True,
                        help="scenario detail <name>_<split>, e.g. f128_r18_softmax_class70")
    parser.add_argument("--output", default=None,
                        help="folder of the feature files (default: feature_save/<scenario> in the repository)")
    return parser


def require_keys(cfg, method, *keys):
    """Stop unless the config sets every key in ``keys`` (a method config outside its folder lacks them)."""
    missing = [key for key in keys if cfg.get(key) is None]
    require(not missing, f"config {cfg.get('config_path')}: {method} needs {', '.join(missing)} "
                         f"(declared in BCT_methods/{method}/configs/base.py; set them in the config)")


def _open(path, key):
    require(isinstance(path, str) and path, f"`{key}` is not set (path of an old-feature file)")
    return safe_np_load(path, mmap_mode="r")


class PerImageArray:
    """A memory-mapped per-image ``.npy`` (N rows in dataset order) read by batch indices.

    ``gather(indices)`` returns the rows of those dataset positions (a CPU tensor) in the order
    given; the reads are sorted by position for locality.
    """

    def __init__(self, path, key, num_rows):
        self.path, self.key = path, key
        self.array = _open(path, key)
        require(len(self.array.shape) >= 1 and self.array.shape[0] == num_rows,
                f"{path} (`{key}`): {self.array.shape[0] if self.array.ndim else 0} rows but the training set has "
                f"{num_rows} images (expected one row per image, in dataset order)")

    def __len__(self):
        return self.array.shape[0]

    def __getstate__(self):   # a worker started by spawn/forkserver maps the file again instead of copying it
        return dict(self.__dict__, array=None)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.array = _open(self.path, self.key)

    def rows(self, indices, ctx):
        """This batch's rows: those the loader's workers read (``ctx.batch_rows[key]``, on the device), else
        read here (a CPU tensor)."""
        rows = getattr(ctx, "batch_rows", {}).get(self.key)
        return self.gather(indices) if rows is None else rows

    def gather(self, indices):
        indices = np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices, dtype=np.int64).reshape(-1)
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices),) + self.array.shape[1:], dtype=self.array.dtype)
        rows[order] = self.array[indices[order]]
        import torch

        return torch.from_numpy(rows)


class OldFeatures(PerImageArray):
    """Old embeddings ``o`` (``old_embedding``): N×d float, d = the new ``embedding_size``.

    Every row is checked to be finite when the file is opened (a chunked pass over the memory map).
    ``gather`` returns float32 rows as stored (un-normalised).
    """

    def __init__(self, path, num_rows, dim, key="old_embedding"):
        super().__init__(path, key, num_rows)
        require(self.array.ndim == 2 and np.issubdtype(self.array.dtype, np.floating),
                f"{path} (`{key}`): expected an N×d float array, got {self.array.dtype} of shape {self.array.shape}")
        require(self.array.shape[1] == dim,
                f"{path} (`{key}`): features have dimension {self.array.shape[1]} but embedding_size is {dim} "
                "(old and new embedding sizes must be equal)")
        try:
            check_finite_rows(self.array)
        except UserError as exc:
            raise UserError(f"{path} (`{key}`): {exc} (extract the old features again)") from None

    def gather(self, indices, device=None):
        return super().gather(indices).float().to(device)

    def rows(self, indices, ctx):
        """This batch's rows as float32 on the training device."""
        return super().rows(indices, ctx).float().to(ctx.device, non_blocking=True)


class CredibleMask(PerImageArray):
    """0/1 mask per image (``credible_old_feature``): 1 = the old feature is credible (step 4)."""

    def __init__(self, path, num_rows, key="credible_old_feature"):
        super().__init__(path, key, num_rows)
        shape = self.array.shape
        require(self.array.ndim == 1 or (self.array.ndim == 2 and shape[1] == 1),
                f"{path} (`{key}`): expected a 0/1 vector with one entry per image, got shape {shape}")
        values = np.unique(np.asarray(self.array).reshape(-1))
        require(np.isin(values, (0, 1)).all(),
                f"{path} (`{key}`): expected only 0/1 values, found {values[~np.isin(values, (0, 1))][:3].tolist()}")
        self.num_credible = int(np.count_nonzero(np.asarray(self.array)))
        require(self.num_credible > 0, f"{path} (`{key}`): the mask marks no sample as credible")

    def gather(self, indices):
        return super().gather(indices).reshape(-1) != 0


def _on_every_process():
    """:func:`utils.distributed.fail_together` (imported here: the feature tools run without torch)."""
    from utils.distributed import fail_together

    return fail_together()


def open_features(ctx, key="old_embedding"):
    """:class:`OldFeatures` of config key ``key``, checked against the training set and ``embedding_size``
    (on every process together: a file missing on one node stops them all)."""
    with _on_every_process():
        return OldFeatures(ctx.cfg.get(key), len(ctx.dataset), ctx.cfg.embedding_size, key)


def open_mask(ctx, key="credible_old_feature"):
    """:class:`CredibleMask` of config key ``key``, checked against the training set (on every process together)."""
    with _on_every_process():
        return CredibleMask(ctx.cfg.get(key), len(ctx.dataset), key)


def load_prototypes(path, num_classes, dim, key="old_prototype"):
    """Class prototypes (step 3): a C×d float file, row c = class c; returned as a float32 tensor."""
    array = _open(path, key)
    require(array.ndim == 2 and np.issubdtype(array.dtype, np.floating),
            f"{path} (`{key}`): expected a C×d float array, got {array.dtype} of shape {array.shape}")
    require(array.shape[0] == num_classes,
            f"{path} (`{key}`): {array.shape[0]} prototypes but the training set has {num_classes} classes")
    require(array.shape[1] == dim,
            f"{path} (`{key}`): prototypes have dimension {array.shape[1]} but embedding_size is {dim}")
    prototypes = np.array(array, dtype=np.float32)
    require(bool(np.isfinite(prototypes).all()), f"{path} (`{key}`): prototypes contain NaN or inf")
    import torch

    return torch.from_numpy(prototypes)


def open_prototypes(ctx, key="old_prototype"):
    """Prototypes of config key ``key`` on the training device, checked against the classifier (on every
    process together)."""
    with _on_every_process():
        prototypes = load_prototypes(ctx.cfg.get(key), ctx.classifier.num_classes, ctx.cfg.embedding_size, key)
    return prototypes.to(ctx.device)
