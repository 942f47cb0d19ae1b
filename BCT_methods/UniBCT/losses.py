"""UniBCT: BCT with old prototypes refined by graph propagation over the new features.

Zhang et al., "Towards Universal Backward-Compatible Representation Learning", IJCAI 2022. At the
refine epochs (10 and 20) the whole training set is embedded with the current new model and, for
every class c with n images, the old features O_c (n×d) are propagated over the new-feature graph:

    S = n̂(F_c)·n̂(F_c)ᵀ / τ  (diagonal masked out),   A = softmax(S) over rows or columns,
    Π = (1 − λ)(I − λA)⁻¹,   refined O_c = Π·O_c,   prototype_c = mean of the rows of Π·O_c

(τ = 0.05, λ = 0.9). Only the mean is needed, so it is computed as wᵀO_c with w = Πᵀ1/n (one
solve with one right-hand side per class). A one-image class keeps its old feature (Π = 1).
The influence loss is that of BCT with weight 0 before the first refine epoch and 1 after.

Two switches reproduce the published code by default:

* ``refine_softmax = "column"``: A is column-stochastic, so 1ᵀΠ = 1ᵀ and the prototype is exactly
  the plain class mean of the old features (the refinement refines nothing). ``"row"``: every row
  of Π sums to 1, each refined old feature is a weighted average of its class's old features,
  weighted by how the new model relates the images.
* ``refine_normalize = False``: the prototype is not normalised, so the influence logits become
  ‖μ_c‖·cos from the first refinement on. True L2-normalises it like the step-3 prototypes (then
  λ → 0 gives back exactly the step-3 prototype).
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

from BCT_methods.BCT.losses import BCT
from utils.dataset import MXFaceDataset
from utils.distributed import compute_on_main
from utils.errors import require
from utils.embedding import embed_dataset
from utils.old_features import open_features, require_keys
from utils.trainer import autocast_dtype


SOFTMAX_DIMS = {"row": -1, "column": -2}


def propagation_weights(new, lam, tau, softmax="row"):
    """Weights w (G×n) with ``mean of the rows of Π·O = Σ_j w_j O_j``; ``new``: G classes × n images × d (n ≥ 2).

    w = Πᵀ1/n = (1 − λ)(I − λA)⁻ᵀ 1/n: one linear solve per class instead of n×d right-hand sides.
    ``softmax``: "row" or "column" (the published normalisation of A; then w = 1/n exactly).
    """
    unit = F.normalize(new.float(), dim=-1)
    scores = unit @ unit.transpose(1, 2) / tau
    scores.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    affinity = torch.softmax(scores, dim=SOFTMAX_DIMS[softmax])
    count = new.shape[1]
    eye = torch.eye(count, dtype=affinity.dtype, device=affinity.device)
    ones = torch.full((new.shape[0], count, 1), (1 - lam) / count, dtype=affinity.dtype, device=affinity.device)
    return torch.linalg.solve((eye - lam * affinity).transpose(1, 2), ones).squeeze(2)


def refine_prototypes(new_features, old_features, labels, num_classes, lam=0.9, tau=0.05, normalize=True,
                      device="cpu", max_elements=1 << 24, softmax="row"):
    """UniBCT prototypes (C×d float32 tensor on ``device``) from N×d new and old features in dataset order.

    Classes are processed in batches of equal size (G×n×n blocks, at most about ``max_elements``
    values per block). A class without images gets a zero row.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    order = np.argsort(labels, kind="stable")
    starts = np.cumsum(counts) - counts
    dim = old_features.shape[1]
    prototypes = torch.zeros(num_classes, dim, dtype=torch.float32, device=device)
    for size in np.unique(counts[counts > 0]):
        classes = np.flatnonzero(counts == size)
        step = max(1, max_elements // (int(size) * max(int(size), dim)))
        for first in range(0, len(classes), step):
            group = classes[first:first + step]
            rows = order[starts[group][:, None] + np.arange(size)].reshape(-1)
            take = np.sort(rows)
            position = np.searchsorted(take, rows)
            old = torch.from_numpy(np.asarray(old_features[take], dtype=np.float32)[position]).to(device)
            old = old.view(len(group), size, dim)
            if size == 1:
                refined = old[:, 0]
            else:
                new = torch.from_numpy(np.asarray(new_features[take], dtype=np.float32)[position]).to(device)
                weights = propagation_weights(new.view(len(group), size, dim), lam, tau, softmax)
                refined = (weights.unsqueeze(1) @ old).squeeze(1)
            prototypes[torch.from_numpy(group).to(device)] = refined
    return F.normalize(prototypes) if normalize else prototypes


class UniBCT(BCT):
    """BCT whose prototypes are refined at ``refine_epochs``; keys as BCT plus ``old_embedding``,
    ``refine_epochs``, ``refine_lambda``, ``refine_tau``, ``refine_softmax``, ``refine_normalize``.

    The refined prototypes and the epochs already refined are method state (checkpointed), so a run
    resumed after a refine epoch continues with the refined prototypes.
    """

    persistent_workers = False   # refine re-embeds the data with loader workers of its own: no live workers beside them

    name = "UniBCT"

    def setup(self, ctx):
        super().setup(ctx)
        cfg = ctx.cfg
        require_keys(cfg, self.name, "old_embedding", "refine_epochs", "refine_lambda", "refine_tau", "refine_softmax",
                     "refine_normalize")
        require(cfg.refine_softmax in SOFTMAX_DIMS,
                f"config {cfg.config_path}: refine_softmax must be 'row' or 'column', got {cfg.refine_softmax!r}")
        self.refine_epochs = sorted(int(e) for e in cfg.refine_epochs)
        require(all(0 <= e < cfg.num_epoch for e in self.refine_epochs),
                f"config {cfg.config_path}: refine_epochs {tuple(cfg.refine_epochs)} must lie in "
                f"[0, num_epoch={cfg.num_epoch})")
        require(0 <= cfg.refine_lambda < 1 and cfg.refine_tau > 0,
                f"config {cfg.config_path}: refine_lambda must be in [0, 1) and refine_tau > 0, "
                f"got {cfg.refine_lambda} and {cfg.refine_tau}")
        self.old = open_features(ctx)
        self.refined = []

    def influence_weight(self, ctx):
        started = not self.refine_epochs or ctx.epoch >= self.refine_epochs[0]
        return float(ctx.cfg.loss_weight) if started else 0.0

    def on_epoch_start(self, epoch, ctx):
        if epoch in self.refine_epochs and epoch not in self.refined:
            self.refine(ctx)
            self.refined.append(epoch)

    def refine(self, ctx):
        """Embed the training set with the current backbone (all ranks) and refine on rank 0."""
        cfg = ctx.cfg
        ctx.logger.info(f"UniBCT: embedding {len(ctx.dataset)} images to refine the prototypes (epoch {ctx.epoch})")
        dataset = MXFaceDataset(cfg.rec, train=False, input_size=cfg.input_size, seed=cfg.seed, uint8=True)
        dtype = autocast_dtype(cfg, ctx.device)   # the plain backbone: not recompiled for eval mode, no DDP
        new = embed_dataset(ctx.plain_backbone, dataset, cfg.batch_size, ctx.dist, num_workers=cfg.num_workers,
                            amp=dtype is not None, amp_dtype=dtype or torch.float16)
        start = time.perf_counter()
        (self.prototypes,) = compute_on_main(lambda: [refine_prototypes(
            new, self.old.array, ctx.dataset.labels, ctx.classifier.num_classes, cfg.refine_lambda, cfg.refine_tau,
            cfg.refine_normalize, ctx.device, softmax=cfg.refine_softmax)], ctx.device)
        ctx.logger.info(f"UniBCT: prototypes refined (on rank 0 in {time.perf_counter() - start:.1f} s)")

    def state_dict(self):
        if not self.refined:
            return {"refined": []}
        return {"refined": list(self.refined), "prototypes": self.prototypes.cpu()}

    def load_state_dict(self, state):
        self.refined = [int(e) for e in state.get("refined", [])]
        if self.refined:
            self.prototypes = state["prototypes"].to(self.prototypes.device)
