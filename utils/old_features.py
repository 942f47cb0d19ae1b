"""Old-model data the BCT methods read while training: per-image features and masks, class prototypes.

Files come from steps 2–4 of the pipeline, one row per image of the new training set in dataset
order (``<SD>_feature.npy``, ``<SD>_credible_ratio_<100T>_feature.npy``) or one row per class
(``<SD>_avg_feature.npy``). Per-image files are memory-mapped and read per batch, so no rank holds
a whole 3.6M×512 file. Everything is validated before training starts: a missing file, a row count
that differs from the training set, a dimension that differs from ``embedding_size`` or a mask
without any credible sample stops the run with one :class:`~utils.errors.UserError` line.
"""
import numpy as np
import torch

from utils.errors import UserError, require
from utils.feature_stats import check_finite_rows
from utils.io import safe_np_load


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

    def gather(self, indices):
        indices = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64).reshape(-1)
        order = np.argsort(indices, kind="stable")
        rows = np.empty((len(indices),) + self.array.shape[1:], dtype=self.array.dtype)
        rows[order] = self.array[indices[order]]
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


def open_features(ctx, key="old_embedding"):
    """:class:`OldFeatures` of config key ``key``, checked against the training set and ``embedding_size``."""
    return OldFeatures(ctx.cfg.get(key), len(ctx.dataset), ctx.cfg.embedding_size, key)


def open_mask(ctx, key="credible_old_feature"):
    """:class:`CredibleMask` of config key ``key``, checked against the training set."""
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
    prototypes = torch.from_numpy(np.array(array, dtype=np.float32))
    require(bool(torch.isfinite(prototypes).all()), f"{path} (`{key}`): prototypes contain NaN or inf")
    return prototypes


def open_prototypes(ctx, key="old_prototype"):
    """Prototypes of config key ``key`` on the training device, checked against the classifier."""
    return load_prototypes(ctx.cfg.get(key), ctx.classifier.num_classes, ctx.cfg.embedding_size, key).to(ctx.device)

