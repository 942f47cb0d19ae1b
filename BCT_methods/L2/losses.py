"""L2 and weakened L2: pull each new embedding towards the old embedding of the same image.

The L2 baseline of the BCT literature (e.g. Shen et al., CVPR 2020; Liang et al., MixBCT) and its
weakened form used in the MixBCT paper, which tolerates a distance up to a margin t:

    L = L_cls + λ · mean_i max(‖n̂(f_i) − n̂(o_i)‖₂ − t, 0)

λ = 10 (``loss_weight``); t = 0 for L2 and 0.2 for weakened L2 (``threshold``).
"""
import torch.nn.functional as F

from utils.errors import require
from utils.old_features import open_features, require_keys
from utils.trainer import Method


def weakened_l2_loss(new, old, margin=0.0):
    """``mean_i max(‖n̂(new_i) − n̂(old_i)‖₂ − margin, 0)``; margin 0 gives the plain L2 loss."""
    distance = (F.normalize(new.float()) - F.normalize(old.float())).norm(dim=1)
    return F.relu(distance - margin).mean()


class L2(Method):
    """``L = L_cls + loss_weight · weakened_l2``; keys ``old_embedding``, ``loss_weight``, ``threshold``."""

    name = "L2"

    def setup(self, ctx):
        cfg = ctx.cfg
        require_keys(cfg, self.name, "old_embedding", "loss_weight", "threshold")
        require(cfg.threshold >= 0, f"config {cfg.config_path}: threshold must be >= 0, got {cfg.threshold}")
        self.old = open_features(ctx)

    def per_image_arrays(self):
        return {self.old.key: self.old}

    def compute_loss(self, embeddings, labels, indices, ctx):
        cls = ctx.classifier(embeddings, labels)
        l2 = weakened_l2_loss(embeddings, self.old.rows(indices, ctx), ctx.cfg.threshold)
        return cls + ctx.cfg.loss_weight * l2, {"cls": cls.detach(), "l2": l2.detach()}
