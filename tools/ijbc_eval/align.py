"""Face alignment for IJB evaluation: Umeyama similarity to the 112×112 template, and the image dataset.

:func:`umeyama` solves the least-squares similarity (rotation, uniform scale, translation) for a
whole stack of landmark sets in one batched SVD, the estimate of scikit-image's
``SimilarityTransform`` (Umeyama 1991). :class:`AlignedFaces` reads each listed image in a
DataLoader worker, warps it with its matrix (``cv2.warpAffine``, border 0), converts BGR→RGB
(grey images are read as three channels) and resizes it to each requested input size with
``INTER_AREA``.
"""
import os

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
ALIGNED_SIZE = 112


def umeyama(src, dst=TEMPLATE):
    """Similarity matrices (…, 2, 3) mapping each landmark set ``src`` (…, n, 2) onto ``dst`` (n, 2).

    Least squares over the n points; reflections are excluded. A landmark set whose points all
    coincide has no solution and gives a matrix of NaNs.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean = src.mean(axis=-2, keepdims=True)
    dst_mean = dst.mean(axis=-2, keepdims=True)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = np.swapaxes(dst_c, -1, -2) @ src_c / src.shape[-2]
    u, s, vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    d = np.stack([np.ones_like(sign), np.where(sign < 0, -1.0, 1.0)], axis=-1)
    rotation = (u * d[..., None, :]) @ vt
    variance = (src_c ** 2).sum(axis=(-1, -2)) / src.shape[-2]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(variance > 0, (s * d).sum(-1) / variance, np.nan)
    linear = scale[..., None, None] * rotation
    shift = dst_mean[..., 0, :] - (linear @ np.swapaxes(src_mean, -1, -2))[..., 0]
    return np.concatenate([linear, shift[..., :, None]], axis=-1)


def align_image(bgr, matrix, sizes):
    """RGB uint8 crops (one per size in ``sizes``) of a BGR image warped by ``matrix`` to 112×112."""
    aligned = cv2.warpAffine(bgr, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), borderValue=0.0)
    rgb = cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB)
    return [rgb if size == ALIGNED_SIZE else cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
            for size in sizes]


class AlignedFaces(Dataset):
    """``ds[i] → (tuple of uint8 tensors 3×S×S, one per size, index i, readable flag)``.

    An image that cannot be read gives zero crops and ``readable = False``; the caller reports it.
    """

    def __init__(self, folder, names, matrices, sizes):
        self.folder = folder
        self.names = np.asarray(names)
        self.matrices = np.asarray(matrices, np.float64)
        self.sizes = tuple(sizes)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        bgr = cv2.imread(os.path.join(self.folder, str(self.names[index])), cv2.IMREAD_COLOR)
        if bgr is None:
            crops = [np.zeros((size, size, 3), np.uint8) for size in self.sizes]
        else:
            crops = align_image(bgr, self.matrices[index], self.sizes)
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1))) for c in crops)
        return tensors, index, bgr is not None
