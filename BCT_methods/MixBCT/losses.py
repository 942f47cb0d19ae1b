"""MixBCT: mixing denoised old features into the new model's classification batch.

Liang et al., "MixBCT: Towards Self-Adapting Backward-Compatible Training". Each step, among the
batch samples whose old feature is credible (the per-class denoising mask of step 4), ``k'`` =
min(k, #credible) with k = int(batch_size · mix_ratio) are picked at random and their new
embeddings are **replaced** by their L2-normalised old features n̂(o). The loss is the ordinary
margin softmax on that mixed batch, ``L = L_cls(mix(f, n̂(o)), y)``: the classifier has to separate
the old features together with the new ones, which bounds the new features by the spread of the
old ones without a hand-set margin.
"""
import torch
import torch.nn.functional as F

from utils.errors import require
from utils.old_features import open_features, open_mask, require_keys
from utils.trainer import Method


def choose_mixed(credible, k, generator=None):
    """Boolean mask of ``min(k, credible.sum())`` rows drawn uniformly at random among the credible ones.

    ``credible``: bool vector (one entry per batch sample, on any device). The scores are drawn on the
    CPU from the torch RNG (``generator`` or the global one), so a resumed run draws the same rows. The
    k best scores are taken and the non-credible ones among them (score −1) dropped, so the count
    is never read on the host.
    """
    scores = torch.rand(credible.shape[0], generator=generator).to(credible.device, non_blocking=True)
    scores = torch.where(credible, scores, torch.full_like(scores, -1.0))
    best = torch.topk(scores, min(int(k), credible.shape[0]))
    chosen = torch.zeros_like(credible)
    chosen[best.indices] = best.values >= 0
    return chosen


def mix_embeddings(embeddings, chosen, old):
    """The batch with rows ``chosen`` (bool, one per row) replaced by n̂(o); ``old`` = the batch's old features.

    Replaced rows carry no gradient to the backbone. A masked select, so the GPU never waits for the host.
    """
    return torch.where(chosen[:, None], F.normalize(old.float()).to(embeddings.dtype), embeddings)


class MixBCT(Method):
    """``L = L_cls(mixed batch)``; config keys ``old_embedding``, ``credible_old_feature``, ``mix_ratio``.

    Logged: the loss part ``cls`` and the count ``mixed_rows`` (rows replaced per step on this process).
    """

    name = "MixBCT"

    def setup(self, ctx):
        cfg = ctx.cfg
        require_keys(cfg, self.name, "old_embedding", "credible_old_feature", "mix_ratio")
        require(0.0 <= cfg.mix_ratio <= 1.0,
                f"config {cfg.config_path}: mix_ratio must be in [0, 1], got {cfg.mix_ratio}")
        self.old = open_features(ctx)
        self.mask = open_mask(ctx)
        self.k = int(cfg.batch_size * cfg.mix_ratio)
        ctx.logger.info(f"MixBCT: {self.mask.num_credible} of {len(self.mask)} old features credible; "
                        f"up to {self.k} of {cfg.batch_size} embeddings per process replaced each step")

    def per_image_arrays(self):
        return {self.old.key: self.old, self.mask.key: self.mask}

    def compute_loss(self, embeddings, labels, indices, ctx):
        chosen = choose_mixed(self.mask.rows(indices, ctx), self.k).to(ctx.device, non_blocking=True)
        mixed = mix_embeddings(embeddings, chosen, self.old.rows(indices, ctx))
        loss = ctx.classifier(mixed, labels)
        return loss, {"cls": loss.detach(), "mixed_rows": chosen.sum()}
