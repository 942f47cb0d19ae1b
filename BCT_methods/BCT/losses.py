"""BCT: the influence loss through the old model's fixed class prototypes.

Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020. The new embedding
is classified by a frozen classifier made of the old class prototypes P (step 3: per class the
n̂-mean of the old features, one row per class of the new training set):

    L = L_cls + λ · CE(n̂(f) · Pᵀ, y)

with raw cosine logits (no scale, no margin), as the published code.
"""
import torch.nn.functional as F

from utils.old_features import open_prototypes, require_keys
from utils.trainer import Method


def influence_loss(embeddings, labels, prototypes):
    """``CE(n̂(f)·Pᵀ, y)``: mean softmax cross entropy of the cosine-to-prototype logits (no scale).

    ``embeddings`` N×d (any norm), ``prototypes`` C×d (used as given, normally unit rows), ``labels`` N.
    """
    return F.cross_entropy(F.normalize(embeddings.float()) @ prototypes.t(), labels)


class BCT(Method):
    """``L = L_cls + loss_weight · influence``; config keys ``old_prototype``, ``loss_weight`` (λ, 1)."""

    name = "BCT"

    def setup(self, ctx):
        require_keys(ctx.cfg, self.name, "old_prototype", "loss_weight")
        self.prototypes = open_prototypes(ctx)

    def influence_weight(self, ctx):
        return float(ctx.cfg.loss_weight)

    def compute_loss(self, embeddings, labels, indices, ctx):
        cls = ctx.classifier(embeddings, labels)
        weight = self.influence_weight(ctx)
        if weight == 0:
            return cls, {"cls": cls.detach(), "influence": 0.0}
        influence = influence_loss(embeddings, labels, self.prototypes)
        return cls + weight * influence, {"cls": cls.detach(), "influence": influence.detach()}
