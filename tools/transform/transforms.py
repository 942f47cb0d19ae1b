"""Gallery transforms h: old-model embedding space → new-model embedding space (forward compatibility).

Instead of re-embedding (backfilling) a stored gallery with the new model, map each stored old
embedding into the new space and search it with new-model queries. h is learnt from (old
feature, new feature) pairs of the same images — the new model's training set embedded by both
models — and needs no image afterwards.

Three kinds, all acting on the L2-normalised old embedding ``x`` (face embeddings are compared by
cosine, and the raw norms of two models are unrelated) and fitted to the L2-normalised new one:

``linear``      ``h(x) = x W + b``, least squares (closed form: normal equations in float64).
``procrustes``  ``h(x) = x R``, ``R`` with orthonormal rows/columns minimising ``‖X R − Y‖``
                (closed form: ``R = U Vᵀ`` from the SVD ``Xᵀ Y = U S Vᵀ``).
``fct``         the FCT transformation of Ramanujan et al., CVPR 2022 (apple/ml-fct
                ``MLP_BN_SIDE_PROJECTION``) without side information, as its released code runs it
                then (the old embedding is also the side-information input): two projections
                d_old → 2·d_old → 2·d_new (Linear, BatchNorm, ReLU), concatenated, then a mixer
                4·d_new → 2048 → 2048 → d_new; MSE loss; Adam lr 5e-4, weight decay 2⁻¹⁵, batch
                1024, 80 epochs with a 5-epoch linear warm-up then cosine decay, BatchNorm in eval
                mode for the second half (the released ImageNet/CIFAR-100 settings).

A fitted h is saved with :func:`save` as plain tensors and numbers (loadable with
``torch.load(weights_only=True)``); :func:`apply_file` maps a stored ``.npy`` feature file in
blocks through a memory map, written atomically.
"""
import math
import os
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.errors import UserError, require
from utils.io import atomic_path, atomic_torch_save, safe_np_load, safe_torch_load

KINDS = ("linear", "procrustes", "fct")
BLOCK_ROWS = 65536
FCT = dict(inner_dim=2048, lr=5e-4, weight_decay=0.000030517578125, batch_size=1024, epochs=80, warmup=5)


def normalise(x):
    """Rows divided by their L2 norm (zero rows stay zero), float32 tensor."""
    x = torch.tensor(np.asarray(x, np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class LinearMap(nn.Module):
    """``h(x) = normalise(x) W + b`` (``procrustes``: orthogonal ``W``, ``b = 0``)."""

    def __init__(self, in_dim, out_dim, kind="linear"):
        super().__init__()
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim
        self.weight = nn.Parameter(torch.zeros(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, x):
        return normalise(x) @ self.weight + self.bias


def _block(d_in, d_out, last=False):
    """1×1-convolution block of ml-fct on a (B, d) vector: Linear (no bias before BatchNorm), BatchNorm, ReLU."""
    if last:
        return [nn.Linear(d_in, d_out)]
    return [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU()]


class FCTTransform(nn.Module):
    """FCT transformation without side information (see the module doc)."""

    def __init__(self, in_dim, out_dim, inner_dim=FCT["inner_dim"]):
        super().__init__()
        self.kind, self.in_dim, self.out_dim, self.inner_dim = "fct", in_dim, out_dim, inner_dim
        self.project = nn.Sequential(*_block(in_dim, 2 * in_dim), *_block(2 * in_dim, 2 * out_dim))
        self.side = nn.Sequential(*_block(in_dim, 2 * in_dim), *_block(2 * in_dim, 2 * out_dim))
        self.mixer = nn.Sequential(*_block(4 * out_dim, inner_dim), *_block(inner_dim, inner_dim),
                                   *_block(inner_dim, out_dim, last=True))

    def forward(self, x):
        x = normalise(x)
        return self.mixer(torch.cat([self.project(x), self.side(x)], dim=1))


def build(kind, in_dim, out_dim, inner_dim=FCT["inner_dim"]):
    require(kind in KINDS, f"unknown transform kind {kind!r} (expected one of {', '.join(KINDS)})")
    return FCTTransform(in_dim, out_dim, inner_dim) if kind == "fct" else LinearMap(in_dim, out_dim, kind)


# ------------------------------------------------------------------------------------ fitting
def _blocks(old, new, block=BLOCK_ROWS):
    """``(normalised old, normalised new)`` float64 numpy blocks of two row-aligned (memory-mapped) arrays."""
    for start in range(0, len(old), block):
        yield (normalise(old[start:start + block]).double().numpy(),
               normalise(new[start:start + block]).double().numpy())


def least_squares(pairs):
    """``(W, b)`` minimising ``‖x W + b − y‖²`` over row blocks ``(x, y)`` (normal equations, float64)."""
    gram, cross, dim = None, None, None
    for xb, yb in pairs:
        xb = np.concatenate([xb, np.ones((len(xb), 1))], axis=1)
        gram = xb.T @ xb if gram is None else gram + xb.T @ xb
        cross = xb.T @ yb if cross is None else cross + xb.T @ yb
        dim = xb.shape[1] - 1
    solution = np.linalg.lstsq(gram, cross, rcond=None)[0]
    return solution[:dim], solution[dim]


def procrustes(pairs):
    """Orthogonal ``R`` minimising ``‖x R − y‖`` over row blocks ``(x, y)``: ``U Vᵀ`` of ``Σ xᵀ y``."""
    cross = None
    for xb, yb in pairs:
        cross = xb.T @ yb if cross is None else cross + xb.T @ yb
    u, _, vt = np.linalg.svd(cross, full_matrices=False)
    return u @ vt


def fct_learning_rate(epoch, epochs, warmup=FCT["warmup"], lr=FCT["lr"]):
    """ml-fct's cosine_lr: linear warm-up ``lr·(e+1)/warmup``, then ``lr·(1 + cos(π·(e−w)/(E−w)))/2``."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup))) * lr


def train_fct(old, new, epochs=FCT["epochs"], batch_size=FCT["batch_size"], inner_dim=FCT["inner_dim"], seed=0,
              log=print):
    """An :class:`FCTTransform` trained on row-aligned (memory-mapped) arrays with the published recipe."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = FCTTransform(old.shape[1], new.shape[1], inner_dim)
    optimiser = torch.optim.Adam(model.parameters(), lr=FCT["lr"], weight_decay=FCT["weight_decay"])
    loss_fn = nn.MSELoss()
    warmup = min(FCT["warmup"], max(1, epochs // 2))
    for epoch in range(epochs):
        for group in optimiser.param_groups:
            group["lr"] = fct_learning_rate(epoch, epochs, warmup)
        model.train(epoch < epochs / 2)          # ml-fct switch_mode_to_eval: BatchNorm frozen for the second half
        order = rng.permutation(len(old))
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = np.sort(order[start:start + batch_size])
            if len(rows) < 2 and model.training:
                continue                          # BatchNorm needs two rows
            loss = loss_fn(model(old[rows]), normalise(new[rows]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        log(f"fct epoch {epoch + 1}/{epochs}: lr {optimiser.param_groups[0]['lr']:.2e}, mse {total / len(order):.6f}")
    return model.eval()


def fit(kind, old, new, epochs=FCT["epochs"], inner_dim=FCT["inner_dim"], seed=0, log=print,
        batch_size=FCT["batch_size"]):
    """A fitted transform (eval mode) of ``kind`` from row-aligned old/new feature arrays."""
    require(len(old) == len(new), f"old and new features must have one row per image each, got {len(old)} and "
                                  f"{len(new)} rows")
    require(len(old) >= 2, f"need at least 2 feature pairs to fit a transform, got {len(old)}")
    if kind == "fct":
        return train_fct(old, new, epochs, batch_size, inner_dim, seed, log)
    model = build(kind, old.shape[1], new.shape[1])
    if kind == "linear":
        weight, bias = least_squares(_blocks(old, new))
    else:
        weight, bias = procrustes(_blocks(old, new)), np.zeros(new.shape[1])
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
        model.bias.copy_(torch.from_numpy(bias))
    return model.eval()


# ------------------------------------------------------------------------------ saving, applying
def save(model, path, **about):
    """Write ``{"kind", "in_dim", "out_dim", "inner_dim", "state", "about"}`` (tensors, text, numbers) atomically."""
    atomic_torch_save({"kind": model.kind, "in_dim": model.in_dim, "out_dim": model.out_dim,
                       "inner_dim": getattr(model, "inner_dim", 0), "state": model.state_dict(),
                       "about": {k: str(v) for k, v in about.items()}}, path)
    return path


def load(path):
    """``(model in eval mode, saved dict)`` of a file written by :func:`save`."""
    saved = safe_torch_load(path)
    keys = ("kind", "in_dim", "out_dim", "inner_dim", "state")
    require(isinstance(saved, dict) and all(k in saved for k in keys),
            f"{path}: not a gallery transform (expected a file written by tools/transform/fit_transform.py)")
    require(saved["kind"] in KINDS, f"{path}: unknown transform kind {saved['kind']!r}")
    model = build(saved["kind"], saved["in_dim"], saved["out_dim"], saved["inner_dim"] or FCT["inner_dim"])
    try:
        model.load_state_dict(saved["state"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not match a {saved['kind']} transform "
                        f"({str(exc).splitlines()[0]})") from None
    return model.eval(), saved


@torch.no_grad()
def transform_rows(model, rows, block=BLOCK_ROWS):
    """``h`` of every row of a (memory-mapped) array, float32 numpy, in blocks."""
    require(rows.ndim == 2 and rows.shape[1] == model.in_dim,
            f"the transform maps {model.in_dim}-d old embeddings, got an array of shape {rows.shape}")
    out = np.empty((len(rows), model.out_dim), np.float32)
    for start in range(0, len(rows), block):
        out[start:start + block] = model(rows[start:start + block]).numpy()
    return out


@torch.no_grad()
def apply_file(model, source, target, block=BLOCK_ROWS):
    """Write ``h(rows of source)`` (an N×d ``.npy``, memory-mapped) to ``target`` (float32 ``.npy``) in
    blocks, atomically; returns the seconds spent transforming (reading and writing included)."""
    rows = safe_np_load(source, mmap_mode="r")
    require(rows.ndim == 2, f"{source}: expected an N×d feature array, got shape {rows.shape}")
    require(rows.shape[1] == model.in_dim, f"{source}: {rows.shape[1]}-d features, but the transform maps "
                                           f"{model.in_dim}-d old embeddings")
    start = time.perf_counter()
    with atomic_path(target) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), model.out_dim))
        for low in tqdm(range(0, len(rows), block), desc=f"transforming {os.path.basename(source)}", unit="block",
                        mininterval=5):
            out[low:low + block] = model(rows[low:low + block]).numpy()
        out.flush()
        del out
    return time.perf_counter() - start
