"""AdvBCT: an elastic point-to-set boundary plus adversarial alignment of new and old features.

Pan et al., "Boundary-Aware Backward-Compatible Representation via Adversarial Learning in Image
Retrieval", CVPR 2023. From the old features: per class c a centre μ_c (mean of the n̂ old
features) and a radius r_c (largest member distance to μ_c after dropping outliers beyond 1.5·IQR
when the class has ≥ 4 members; ``utils.feature_stats.advbct_class_stats``).

* Elastic boundary, for classes with ≥ 2 kept radii: e_c = sigmoid(w_c)·|r_c − t| with a learnable
  w_c per class (initialised U(−1, 1)) and t = ``threshold`` (0.4); r'_c = r_c + e_c if r_c < t,
  else r_c − e_c.  L_p2s = 4 · mean_i max(‖n̂(f_i) − μ_{y_i}‖ − r'_{y_i}, 0)  over those samples
  (by default only those with a positive penalty, see below).
* Adversarial: a discriminator D = Linear(d,100)–BN–ReLU–Linear(100,2)–log-softmax tells old
  features (label 1) from new ones (label 0); the new ones reach it through a gradient-reversal
  layer with coefficient 2/(1 + e^(−10p)) − 1, p = training progress in [0, 1].
  L_adv = 4 · (E − epoch + 1)/E · (NLL(D(GRL(n̂(f))), 0) + NLL(D(n̂(o)), 1)), epoch counted from 0.

L = L_cls + L_p2s + L_adv. Three switches reproduce the published code by default:

* ``discriminator_joint_batch = False``: D sees the new and the old features in two calls, so its
  BatchNorm normalises each group on its own and D cannot use a shift of mean or scale between
  them (the published adversarial term stays near chance, 2·ln 2). True: one joint batch.
* ``p2s_average = "violating"``: L_p2s is averaged over the samples with a positive penalty;
  ``"all"``: over every sample of a boundary class, as the formula is written.
* ``clip_extra_modules = True``: the discriminator and the boundary weights are clipped together with
  the backbone (to one gradient norm, as they lived inside the published backbone); False: the
  backbone alone is clipped.
"""
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from utils.distributed import compute_on_main
from utils.errors import require
from utils.feature_stats import advbct_class_stats
from utils.old_features import open_features, require_keys
from utils.trainer import Method


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``−coefficient`` (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, tensor, coefficient):
        ctx.coefficient = float(coefficient)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.coefficient, None


def grl_coefficient(progress):
    """``2 / (1 + exp(−10·p)) − 1``: 0 at the start of training, → 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * float(progress))) - 1.0


class Discriminator(nn.Sequential):
    """Linear(d, hidden)–BatchNorm1d–ReLU–Linear(hidden, 2)–LogSoftmax: log P(new), log P(old)."""

    def __init__(self, dim, hidden=100):
        super().__init__(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, 2), nn.LogSoftmax(dim=1))


def adversarial_loss(discriminator, new_normalized, old_normalized, coefficient, joint_batch=False):
    """``NLL(D(GRL(new)), 0) + NLL(D(old), 1)``, both means; the backbone receives reversed gradients.

    ``joint_batch``: D sees new and old rows as one batch (one BatchNorm batch) instead of two calls.
    """
    reversed_new = GradientReversal.apply(new_normalized, coefficient)
    if joint_batch:
        log_probs = discriminator(torch.cat([reversed_new, old_normalized]))
    else:
        log_probs = torch.cat([discriminator(reversed_new), discriminator(old_normalized)])
    count = new_normalized.shape[0]
    new_target = torch.zeros(count, dtype=torch.long, device=log_probs.device)
    old_target = torch.ones(old_normalized.shape[0], dtype=torch.long, device=log_probs.device)
    return F.nll_loss(log_probs[:count], new_target) + F.nll_loss(log_probs[count:], old_target)


class ElasticBoundary(nn.Module):
    """Learnable per-class boundary: ``r' = r ± sigmoid(w_c)·|r − t|`` (+ below t, − from t on)."""

    def __init__(self, num_classes, threshold):
        super().__init__()
        self.threshold = float(threshold)
        self.weight = nn.Parameter(torch.empty(num_classes).uniform_(-1.0, 1.0))

    def forward(self, radii, classes):
        radius = radii[classes]
        elastic = torch.sigmoid(self.weight[classes]) * (radius - self.threshold).abs()
        return torch.where(radius < self.threshold, radius + elastic, radius - elastic)


def point_to_set_loss(new_normalized, centres, radii, valid, average="all"):
    """Mean of ``max(‖new_i − centre_i‖ − radius_i, 0)`` over the valid rows (``average="all"``) or over
    the valid rows with a positive penalty (``"violating"``, as published); 0 without such rows.

    ``centres`` (N×d), ``radii`` (N) and ``valid`` (N bool) are per row, i.e. indexed by the labels.
    """
    penalty = F.relu((new_normalized - centres).norm(dim=1) - radii)
    used = (valid & (penalty > 0) if average == "violating" else valid).to(penalty.dtype)
    return (penalty * used).sum() / used.sum().clamp(min=1)   # masked: no host sync


class AdvBCT(Method):
    """``L = L_cls + p2s_weight·L_p2s + adv_weight·(E − epoch + 1)/E·L_adv``; keys ``old_embedding``,
    ``threshold`` (0.4), ``p2s_weight`` (4), ``adv_weight`` (4), ``discriminator_hidden`` (100),
    ``discriminator_joint_batch``, ``p2s_average``, ``clip_extra_modules``.
    Extra modules (trained, checkpointed): ``boundary`` (w_c) and ``discriminator``."""

    name = "AdvBCT"

    def setup(self, ctx):
        cfg = ctx.cfg
        require_keys(cfg, self.name, "old_embedding", "threshold", "p2s_weight", "adv_weight", "discriminator_hidden",
                     "discriminator_joint_batch", "p2s_average", "clip_extra_modules")
        require(cfg.threshold >= 0, f"config {cfg.config_path}: threshold must be >= 0, got {cfg.threshold}")
        require(cfg.p2s_average in ("violating", "all"),
                f"config {cfg.config_path}: p2s_average must be 'violating' or 'all', got {cfg.p2s_average!r}")
        self.old = open_features(ctx)
        num_classes = ctx.classifier.num_classes
        labels = ctx.dataset.labels

        def class_stats():
            stats = advbct_class_stats(self.old.array, labels, num_classes)
            return [torch.from_numpy(stats.centres), torch.from_numpy(stats.radii),
                    torch.from_numpy(stats.valid.astype("uint8"))]

        start = time.perf_counter()
        self.centres, self.radii, valid = compute_on_main(class_stats, ctx.device)
        self.valid = valid.bool()
        ctx.logger.info(f"AdvBCT: {int(self.valid.sum())} of {num_classes} classes have an elastic boundary "
                        f"(class statistics on rank 0 in {time.perf_counter() - start:.1f} s)")
        self.boundary = ElasticBoundary(num_classes, cfg.threshold)
        self.discriminator = Discriminator(cfg.embedding_size, cfg.discriminator_hidden)

    def extra_modules(self):
        return {"boundary": self.boundary, "discriminator": self.discriminator}

    def per_image_arrays(self):
        return {self.old.key: self.old}

    def clipped_with_backbone(self):
        if not self.cfg.clip_extra_modules:
            return []
        return [*self.boundary.parameters(), *self.discriminator.parameters()]

    def compute_loss(self, embeddings, labels, indices, ctx):
        cfg = ctx.cfg
        cls = ctx.classifier(embeddings, labels)
        new = F.normalize(embeddings)
        old = F.normalize(self.old.rows(indices, ctx))
        p2s = point_to_set_loss(new, self.centres[labels], self.boundary(self.radii, labels), self.valid[labels],
                                cfg.p2s_average)
        adv = adversarial_loss(self.discriminator, new, old, grl_coefficient(ctx.progress),
                               cfg.discriminator_joint_batch)
        adv_weight = cfg.adv_weight * (cfg.num_epoch - ctx.epoch + 1) / cfg.num_epoch
        loss = cls + cfg.p2s_weight * p2s + adv_weight * adv
        return loss, {"cls": cls.detach(), "p2s": p2s.detach(), "adv": adv.detach()}
