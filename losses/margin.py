"""Additive/multiplicative angular margins on cosine logits (ArcFace, CosFace, combined).

Each loss maps cosine logits ``cos θ`` (N × C, values in [-1, 1]) and labels (N,) to scaled
logits ready for softmax cross entropy. A label of -1 means "this row's class is not among these
C columns" (another rank's shard of the classifier): such a row gets no margin, only the scale.
"""
import math

import torch
from torch import nn

from utils.errors import UserError


class CombinedMarginLoss(nn.Module):
    """Combined margin (insightface; InsightFace/ArcFace paper §3.3, Deng et al., CVPR 2019).

    The target logit becomes ``s·(cos(m1·θ + m2) − m3)`` and every other logit ``s·cos θ``.

    * ``m1 = 1`` (ArcFace, CosFace and their sums): ``cos(θ + m2) = cos θ·cos m2 − sin θ·sin m2``
      while ``cos θ > cos(π − m2)``; beyond that (θ + m2 > π, where the margin would stop being a
      penalty) the ArcFace fallback ``cos θ − m2·sin(π − m2)`` keeps the logit decreasing in θ
      (``easy_margin=False``). ``m3`` is subtracted in both cases.
    * ``m1 ≠ 1`` (SphereFace-style): ``cos(m1·arccos(cos θ) + m2) − m3`` without a fallback.

    ``interclass_filtering_threshold`` t > 0: non-target logits above t (likely label noise) are
    set to 0 before the margin, and so are all logits above t of rows whose label is -1.
    """

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        if not s > 0 or not m1 > 0:
            raise UserError(f"margin loss needs scale s > 0 and m1 > 0, got s={s}, m1={m1}")
        self.s = float(s)
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.cos_m = math.cos(self.m2)
        self.sin_m = math.sin(self.m2)
        self.theta = math.cos(math.pi - self.m2)
        self.sinmm = math.sin(math.pi - self.m2) * self.m2

    def extra_repr(self):
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"

    def target_logit(self, cos_theta):
        """``cos(m1·θ + m2) − m3`` (with the ArcFace fallback when m1 = 1), unscaled."""
        if self.m1 == 1.0:
            sin_theta = torch.sqrt((1.0 - cos_theta * cos_theta).clamp_min(1e-12))
            arc = cos_theta * self.cos_m - sin_theta * self.sin_m
            arc = torch.where(cos_theta > self.theta, arc, cos_theta - self.sinmm)
            return arc - self.m3
        theta = torch.acos(cos_theta.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        return torch.cos(self.m1 * theta + self.m2) - self.m3

    def forward(self, logits, labels):
        labels = labels.reshape(-1)
        labelled = (labels != -1).unsqueeze(1)
        cols = labels.clamp(min=0).unsqueeze(1)  # masked ops, no index list: no wait for the device
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = logits > self.interclass_filtering_threshold
                dirty.scatter_(1, cols, dirty.gather(1, cols) & ~labelled)
            logits = logits.masked_fill(dirty, 0.0)
        out = logits * self.s
        target = self.target_logit(logits.gather(1, cols)) * self.s
        return out.scatter(1, cols, torch.where(labelled, target, out.gather(1, cols)))


class ArcFace(CombinedMarginLoss):
    """ArcFace (Deng et al., CVPR 2019): target logit ``s·cos(θ + m)``, fallback ``s·(cos θ − m·sin(π − m))``
    when θ + m > π."""

    def __init__(self, s=64.0, margin=0.5):
        super().__init__(s, 1.0, margin, 0.0)


class CosFace(CombinedMarginLoss):
    """CosFace / large-margin cosine loss (Wang et al., CVPR 2018): target logit ``s·(cos θ − m)``."""

    def __init__(self, s=64.0, margin=0.4):
        super().__init__(s, 1.0, 0.0, margin)
