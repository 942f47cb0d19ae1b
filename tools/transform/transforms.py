"""Gallery transforms h: old-model embedding space → new-model embedding space (forward compatibility).

Instead of re-embedding (backfilling) a stored gallery with the new model, map each stored old
embedding into the new space and search it with new-model queries. h is learnt from (old
feature, new feature) pairs of the same images — the new model's training set embedded by both
models — and needs no image afterwards.

Four kinds, all acting on the L2-normalised old embedding ``x`` (face embeddings are compared by
cosine, and the raw norms of two models are unrelated) and fitted to the L2-normalised new one:

``linear``             ``h(x) = x W + b``, least squares (closed form: normal equations in float64).
``procrustes``         ``h(x) = x R``, ``R`` with orthonormal rows/columns minimising ``‖X R − Y‖``
                       (closed form: ``R = U Vᵀ`` from the SVD ``Xᵀ Y = U S Vᵀ``).
``procrustes_scaled``  ``h(x) = s (x − x̄) R + ȳ``: Procrustes on centred rows with the least-squares
                       scale ``s = Σ S / ‖X − x̄‖²`` (Umeyama's similarity; it fits an offset).
``fct``                the FCT transformation of Ramanujan et al., CVPR 2022 (apple/ml-fct
                       ``MLP_BN_SIDE_PROJECTION``) without side information (the old embedding is also
                       the side-information input): two projections d_old → 2·d_old → 2·d_new (Linear,
                       BatchNorm, ReLU), concatenated, then a mixer 4·d_new → inner → inner → d_new;
                       MSE loss, Adam. :data:`FCT_RECIPES` holds the published recipe and the default
                       one, which adds a skip path started at the least-squares map (the MLP learns the
                       residual) and stops early on the held-out loss.

:func:`fit_measured` fits any kind on the training identities and reports the held-out fit (mean
cosine and MSE) next to the linear map's and the predict-zero level. A fitted h is saved with
:func:`save` as plain tensors and numbers (loadable with ``torch.load(weights_only=True)``);
:func:`apply_file` maps a stored ``.npy`` feature file in blocks through a memory map, written atomically.
"""
import copy
import math
import os
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from utils.errors import UserError, require
from utils.io import atomic_path, atomic_torch_save, safe_np_load, safe_torch_load

KINDS = ("linear", "procrustes", "procrustes_scaled", "fct")
BLOCK_ROWS = 65536
HELDOUT = 0.2   # share of the identities (of the rows without labels) kept out of fitting to measure it
# FCT training. ``steps``: optimiser steps, or with ``epochs`` passes over the training pairs (the
# schedule then moves per epoch and ``warmup`` counts epochs, as ml-fct's); ``freeze_batchnorm``: the
# last share of the run with BatchNorm in eval mode; ``eval_every``: steps between held-out checks
# (None: one pass); ``patience``: checks without a better held-out loss before stopping (0: the whole
# budget runs and the last weights are kept).
FCT_RECIPES = {
    "default": dict(inner_dim=512, batch_size=128, steps=2000, epochs=None, warmup=100, lr=5e-4,
                    weight_decay=2 ** -15, freeze_batchnorm=0.0, skip=True, eval_every=None, patience=5),
    "published": dict(inner_dim=2048, batch_size=1024, steps=None, epochs=80, warmup=5, lr=5e-4,
                      weight_decay=2 ** -15, freeze_batchnorm=0.5, skip=False, eval_every=None, patience=0),
}
FCT = FCT_RECIPES["default"]


def normalise(x):
    """Rows divided by their L2 norm (zero rows stay zero), float32 tensor."""
    x = torch.tensor(np.asarray(x, np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class LinearMap(nn.Module):
    """``h(x) = normalise(x) W + b`` (``procrustes``: orthogonal ``W``, ``b = 0``; ``procrustes_scaled``:
    ``W = s R``)."""

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
    """FCT transformation without side information (see the module doc); with ``skip`` a linear map
    ``x W + b`` is added to the MLP's output (the MLP's last layer starts at zero)."""

    def __init__(self, in_dim, out_dim, inner_dim=FCT["inner_dim"], skip=FCT["skip"]):
        super().__init__()
        self.kind, self.in_dim, self.out_dim, self.inner_dim = "fct", in_dim, out_dim, inner_dim
        self.project = nn.Sequential(*_block(in_dim, 2 * in_dim), *_block(2 * in_dim, 2 * out_dim))
        self.side = nn.Sequential(*_block(in_dim, 2 * in_dim), *_block(2 * in_dim, 2 * out_dim))
        self.mixer = nn.Sequential(*_block(4 * out_dim, inner_dim), *_block(inner_dim, inner_dim),
                                   *_block(inner_dim, out_dim, last=True))
        self.skip = LinearMap(in_dim, out_dim) if skip else None
        if skip:
            nn.init.zeros_(self.mixer[-1].weight)
            nn.init.zeros_(self.mixer[-1].bias)

    def forward(self, x):
        x = normalise(x)
        out = self.mixer(torch.cat([self.project(x), self.side(x)], dim=1))
        return out + self.skip(x) if self.skip is not None else out


def build(kind, in_dim, out_dim, inner_dim=FCT["inner_dim"], skip=FCT["skip"]):
    require(kind in KINDS, f"unknown transform kind {kind!r} (expected one of {', '.join(KINDS)})")
    return FCTTransform(in_dim, out_dim, inner_dim, skip) if kind == "fct" else LinearMap(in_dim, out_dim, kind)


# ------------------------------------------------------------------------------------ fitting
def _blocks(old, new, rows=None, block=BLOCK_ROWS):
    """``(normalised old, normalised new)`` float64 numpy blocks of two row-aligned (memory-mapped)
    arrays, of the sorted indices ``rows`` (all rows when None)."""
    rows = np.arange(len(old)) if rows is None else rows
    for start in range(0, len(rows), block):
        part = rows[start:start + block]
        yield normalise(old[part]).double().numpy(), normalise(new[part]).double().numpy()


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


def scaled_procrustes(pairs):
    """``(s R, ȳ − s x̄ R)`` minimising ``‖s (x − x̄) R − (y − ȳ)‖`` over row blocks ``(x, y)``, ``R``
    orthogonal: ``R = U Vᵀ`` of the centred ``Σ (x − x̄)ᵀ (y − ȳ) = U S Vᵀ``, ``s = Σ S / ‖x − x̄‖²``
    (sums accumulated in one pass and centred afterwards)."""
    count, sum_x, sum_y, cross, square = 0, 0.0, 0.0, 0.0, 0.0
    for xb, yb in pairs:
        count += len(xb)
        sum_x, sum_y = sum_x + xb.sum(0), sum_y + yb.sum(0)
        cross, square = cross + xb.T @ yb, square + np.sum(xb * xb)
    mean_x, mean_y = sum_x / count, sum_y / count
    u, singular, vt = np.linalg.svd(cross - count * np.outer(mean_x, mean_y), full_matrices=False)
    spread = square - count * mean_x @ mean_x
    weight = (singular.sum() / spread if spread > 0 else 1.0) * (u @ vt)
    return weight, mean_y - mean_x @ weight


def fct_learning_rate(epoch, epochs, warmup, lr=FCT["lr"]):
    """ml-fct's cosine_lr: linear warm-up ``lr·(e+1)/warmup``, then ``lr·(1 + cos(π·(e−w)/(E−w)))/2``
    (``e`` an epoch, or a step when the budget is in steps)."""
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup))) * lr


def split_rows(count, labels=None, heldout=HELDOUT, seed=0):
    """``(training rows, held-out rows, unit)``: sorted row indices, the held-out share ``heldout`` of the
    identities when ``labels`` are given (unit ``"identities"``), else of the rows (``"rows"``)."""
    rng = np.random.default_rng(seed)
    if labels is None:
        chosen = np.zeros(count, bool)
        chosen[rng.permutation(count)[:max(1, round(heldout * count))]] = True
        unit = "rows"
    else:
        identities = np.unique(np.asarray(labels))
        require(len(identities) >= 2, f"a held-out split of identities needs at least 2 identities, got "
                                      f"{len(identities)}")
        kept = rng.permutation(identities)[:min(len(identities) - 1, max(1, round(heldout * len(identities))))]
        chosen, unit = np.isin(labels, kept), "identities"
    require(0 < chosen.sum() < count, f"the held-out share {heldout} leaves no pair on one side of {count} pairs")
    return np.flatnonzero(~chosen), np.flatnonzero(chosen), unit


@torch.no_grad()
def heldout_fit(model, old, new, rows):
    """``{"cosine", "mse"}`` of ``h`` on ``rows``: the mean cosine of ``h(x)`` and the normalised new
    feature, and the mean squared error per coordinate (the training loss)."""
    was_training = model.training
    model.eval()
    cosine, squared = 0.0, 0.0
    for start in range(0, len(rows), BLOCK_ROWS):
        part = rows[start:start + BLOCK_ROWS]
        mapped, target = model(old[part]).double(), normalise(new[part]).double()
        cosine += float((normalise(mapped).double() * target).sum())
        squared += float(((mapped - target) ** 2).sum())
    model.train(was_training)
    return {"cosine": cosine / len(rows), "mse": squared / (len(rows) * model.out_dim)}


def train_fct(old, new, rows=None, heldout_rows=None, seed=0, log=print, **recipe):
    """``(model, history)``: an :class:`FCTTransform` trained on ``rows`` (all when None) of row-aligned
    (memory-mapped) arrays with ``recipe`` (:data:`FCT_RECIPES` keys; the default recipe's values for
    those not given); with ``heldout_rows`` the held-out loss is checked every ``eval_every`` steps
    and the best weights kept (stopping after ``patience`` checks without a better one). ``history``:
    ``{"steps", "best_step", "checks": [(step, held-out cosine, held-out mse), …]}``."""
    unknown = set(recipe) - set(FCT)
    require(not unknown, f"unknown FCT option(s) {', '.join(sorted(unknown))}")
    recipe = dict(FCT, **recipe)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(old)) if rows is None else rows
    batch = min(recipe["batch_size"], len(rows))
    per_epoch = math.ceil(len(rows) / batch)
    unit = per_epoch if recipe["epochs"] else 1            # steps per position of the schedule
    steps = recipe["epochs"] * per_epoch if recipe["epochs"] else recipe["steps"]
    require(steps >= 1 and batch >= 2, f"FCT needs at least 1 step of 2 pairs, got {steps} steps of {batch}")
    positions = math.ceil(steps / unit)
    warmup = min(recipe["warmup"], max(1, positions // 2))
    eval_every = recipe["eval_every"] or per_epoch
    model = FCTTransform(old.shape[1], new.shape[1], recipe["inner_dim"], recipe["skip"])
    if recipe["skip"]:
        weight, bias = least_squares(_blocks(old, new, rows))
        with torch.no_grad():
            model.skip.weight.copy_(torch.from_numpy(weight))
            model.skip.bias.copy_(torch.from_numpy(bias))
    trained = [p for name, p in model.named_parameters() if not name.startswith("skip.")]   # the skip path stays put
    optimiser = torch.optim.Adam(trained, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    history = {"steps": 0, "best_step": 0, "checks": []}
    best, stale = None, 0

    def check(step):
        """Held-out check at ``step``; True when training should stop."""
        nonlocal best, stale
        if heldout_rows is None:
            return False
        fit = heldout_fit(model, old, new, heldout_rows)
        history["checks"].append((step, fit["cosine"], fit["mse"]))
        log(f"fct step {step}/{steps}: held-out cosine {fit['cosine']:.4f}, mse {fit['mse']:.6f}"
            + (f" (lr {optimiser.param_groups[0]['lr']:.2e})" if step else " (before training)"))
        if best is None or fit["mse"] < best[0]:
            best, stale = (fit["mse"], copy.deepcopy(model.state_dict())), 0
            history["best_step"] = step
        else:
            stale += 1
        return 0 < recipe["patience"] <= stale

    order, cursor, total, since = rng.permutation(rows), 0, 0.0, 0
    stop = check(0)
    for step in tqdm(range(steps), desc="fct", unit="step", mininterval=10, disable=stop):
        if stop:
            break
        position = step // unit
        for group in optimiser.param_groups:
            group["lr"] = fct_learning_rate(position, positions, warmup, recipe["lr"])
        model.train(position < (1 - recipe["freeze_batchnorm"]) * positions)   # ml-fct's switch_mode_to_eval
        if cursor + batch > len(order):
            order, cursor = rng.permutation(rows), 0
        part = np.sort(order[cursor:cursor + batch])
        cursor += batch
        loss = nn.functional.mse_loss(model(old[part]), normalise(new[part]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total, since = total + float(loss.detach()), since + 1
        history["steps"] = step + 1
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            if heldout_rows is None:
                log(f"fct step {step + 1}/{steps}: lr {optimiser.param_groups[0]['lr']:.2e}, "
                    f"training mse {total / since:.6f}")
            total, since = 0.0, 0
            stop = check(step + 1)
    if best is not None and recipe["patience"] > 0:
        model.load_state_dict(best[1])
    else:
        history["best_step"] = history["steps"]
    return model.eval(), history


def fit(kind, old, new, rows=None, heldout_rows=None, seed=0, log=print, **recipe):
    """A fitted transform (eval mode) of ``kind`` from ``rows`` (all when None) of row-aligned old/new
    feature arrays; FCT with ``recipe`` (:func:`train_fct`) and ``heldout_rows`` to stop on."""
    return _fit(kind, old, new, rows, heldout_rows, seed, log, **recipe)[0]


def fit_measured(kind, old, new, labels=None, heldout=HELDOUT, seed=0, log=print, **recipe):
    """``(model, figures)``: ``kind`` fitted on the training part of :func:`split_rows` (FCT stopping on
    the held-out part) and its held-out fit next to the linear map's (fitted on the same rows) and the
    predict-zero level: ``{"split", "pairs", "heldout_pairs", "cosine", "mse", "linear_cosine",
    "linear_mse", "zero_mse"}``, for FCT also ``"steps"`` and ``"best_step"``."""
    rows, heldout_rows, unit = split_rows(len(old), labels, heldout, seed)
    model, history = _fit(kind, old, new, rows, heldout_rows, seed, log, **recipe)
    linear = model if kind == "linear" else fit("linear", old, new, rows)
    figures = {"split": unit, "pairs": len(rows), "heldout_pairs": len(heldout_rows)}
    for prefix, fitted in (("", model), ("linear_", linear), ("zero_", build("linear", old.shape[1], new.shape[1]))):
        figures.update({prefix + key: value for key, value in heldout_fit(fitted, old, new, heldout_rows).items()
                        if prefix != "zero_" or key == "mse"})
    if history is not None:
        figures.update(steps=history["steps"], best_step=history["best_step"])
    return model, figures


def figures_line(kind, figures):
    """One line of the held-out figures of :func:`fit_measured`."""
    line = (f"held-out {figures['split']} ({figures['heldout_pairs']} of {figures['pairs'] + figures['heldout_pairs']}"
            f" pairs): {kind} cosine {figures['cosine']:.4f}, mse {figures['mse']:.6f}"
            + ("" if kind == "linear" else f"; linear cosine {figures['linear_cosine']:.4f}, mse {figures['linear_mse']:.6f}")
            + f"; predict-zero mse {figures['zero_mse']:.6f}")
    if "steps" in figures:
        line += f" (fct: {figures['steps']} steps, best at step {figures['best_step']})"
    return line


def _fit(kind, old, new, rows, heldout_rows, seed, log, **recipe):
    """``(model, FCT's training history or None)`` of :func:`fit`."""
    require(len(old) == len(new), f"old and new features must have one row per image each, got {len(old)} and "
                                  f"{len(new)} rows")
    require(len(old) >= 2, f"need at least 2 feature pairs to fit a transform, got {len(old)}")
    if kind == "fct":
        return train_fct(old, new, rows, heldout_rows, seed, log, **recipe)
    model = build(kind, old.shape[1], new.shape[1])
    pairs = _blocks(old, new, rows)
    if kind == "linear":
        weight, bias = least_squares(pairs)
    elif kind == "procrustes_scaled":
        weight, bias = scaled_procrustes(pairs)
    else:
        weight, bias = procrustes(pairs), np.zeros(new.shape[1])
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
        model.bias.copy_(torch.from_numpy(bias))
    return model.eval(), None


# ------------------------------------------------------------------------------ saving, applying
def save(model, path, figures=None, **about):
    """Write ``{"kind", "in_dim", "out_dim", "inner_dim", "skip", "state", "about", "heldout"}`` (tensors,
    text, numbers) atomically; ``heldout``: the figures of :func:`fit_measured` (empty when not measured)."""
    atomic_torch_save({"kind": model.kind, "in_dim": model.in_dim, "out_dim": model.out_dim,
                       "inner_dim": getattr(model, "inner_dim", 0), "skip": getattr(model, "skip", None) is not None,
                       "state": model.state_dict(), "about": {k: str(v) for k, v in about.items()},
                       "heldout": dict(figures or {})}, path)
    return path


def load(path):
    """``(model in eval mode, saved dict)`` of a file written by :func:`save` (``saved["heldout"]``: the
    held-out figures of the fit; absent in files written before they were measured)."""
    saved = safe_torch_load(path)
    keys = ("kind", "in_dim", "out_dim", "inner_dim", "state")
    require(isinstance(saved, dict) and all(k in saved for k in keys),
            f"{path}: not a gallery transform (expected a file written by tools/transform/fit_transform.py)")
    require(saved["kind"] in KINDS, f"{path}: unknown transform kind {saved['kind']!r}")
    model = build(saved["kind"], saved["in_dim"], saved["out_dim"], saved["inner_dim"] or FCT["inner_dim"],
                  saved.get("skip", False))
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
