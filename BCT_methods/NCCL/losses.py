"""NCCL: neighbourhood-consensus contrastive learning against a queue of old features.

Wu et al., "Neighborhood Consensus Contrastive Learning for Backward-Compatible Representation",
AAAI 2022. A FIFO queue (``queue_size`` = 8192) holds old embeddings q_j = n̂(o_j), their labels
and their old logits ζ_j (the old embedding through the current classifier, detached, at enqueue
time). The global batch is enqueued first, so every sample finds itself among its positives.
For sample i with label y_i, positives P_i = {j : label_j = y_i} and consensus weights
w_ij = (1 + n̂(o_i)·q_j) / 2:

    l1 = −mean_i  Σ_{j∈P_i} w_ij · log softmax_j(n̂(f_i)·q_j / τ) / |P_i|
    l2 = −mean_i  Σ_{j∈P_i} w_ij · log softmax_j(z_i·ζ_j / τ)   / |P_i|
    L  = L_cls + s·α·l1 + β·l2           (α = 1, β = 0.01, τ = 1)

z_i = the new embedding's cosine logits over all C classes. The classifier is sharded over the
ranks, so each rank holds its columns of z and ζ: z_i·ζ_j is the sum over ranks of the shards' dot
products (an all-reduce). Three switches reproduce the published code by default:

* ``l2_gradient = False``: the published l2 logits came through a plain all-gather, so l2 carried
  no gradient (it is computed and logged, and trains nothing); True back-propagates l2 into the
  backbone and the classifier.
* ``l1_gradient_scale = 8`` (s): the published all-gather's backward multiplied l1's gradient by
  the process count, so on its 8 GPUs l1 weighed 8·α against the classification loss; 1 gives α.
* ``mask_empty_slots = False``: until the queue has filled, its zero-filled empty slots enter both
  softmax denominators with score 0, as published; True leaves them out.

Optional highly-credible filtering (``credible_old_feature``, off by default as in the published
runs, which found almost every MS1MV3 sample credible): samples whose mask is 0 are neither
enqueued nor used as anchors (mask e.g. from ``utils.feature_stats.nccl_feature_credible_mask``,
entropy ≤ log(C)/2).
"""
import torch
import torch.nn.functional as F

from losses import AllGatherRows, all_gather_rows
from utils.distributed import all_reduce
from utils.errors import require
from utils.old_features import open_features, open_mask, require_keys
from utils.trainer import Method


def consensus_contrastive_loss(scores, labels, queue_labels, weights, tau=1.0, anchors=None, mask_empty=False):
    """``−mean_i Σ_{j pos} w_ij log softmax_j(scores_ij / τ) / |pos_i|`` over the queue entries.

    ``scores``, ``weights``: N×Q; ``labels``: N; ``queue_labels``: Q (−1 = empty slot, never a
    positive). Empty slots stay in the softmax denominator with their score (0 for the zero-filled
    queue, as published) unless ``mask_empty``. Rows without positives, or with ``anchors`` False,
    are left out of the mean (0 if no row is left).
    """
    valid = queue_labels >= 0
    logits = scores / tau
    if mask_empty:   # the lowest finite value: exp() of it is exactly 0 next to any valid entry, and a queue
        # without valid entries gives finite (zero) gradients instead of NaN
        logits = logits.masked_fill(~valid, torch.finfo(scores.dtype).min)
    log_prob = torch.log_softmax(logits, dim=1)
    positive = (labels[:, None] == queue_labels[None, :]) & valid
    count = positive.sum(dim=1)
    per_row = -(weights * log_prob.masked_fill(~positive, 0.0)).sum(dim=1)
    used = (count > 0 if anchors is None else (count > 0) & anchors).to(per_row.dtype)
    return (per_row / count.clamp(min=1) * used).sum() / used.sum().clamp(min=1)   # masked: no host sync


def consensus_weights(old_normalized, queue_features):
    """``w_ij = (1 + n̂(o_i)·q_j) / 2`` (N×Q)."""
    return (1.0 + old_normalized @ queue_features.t()) / 2.0


class SumOverRanks(torch.autograd.Function):
    """All-reduce sum of per-rank partial results. Backward: the mean over ranks of the gradients, so a
    classifier shard gets the gradient of the mean of the per-rank losses."""

    @staticmethod
    def forward(ctx, tensor, world):
        ctx.world = world
        return all_reduce(tensor.clone())

    @staticmethod
    def backward(ctx, grad):
        if ctx.world == 1:
            return grad, None
        return all_reduce(grad.contiguous().clone()) / ctx.world, None


class OldFeatureQueue:
    """FIFO ring buffer of n̂(o), labels and this rank's shard of the old logits (empty slots: label −1).

    Everything is fp32 (as the published queue): fp16 logits would let the small l2 gradients
    underflow when no loss scaling runs.
    """

    def __init__(self, size, dim, num_logits, device):
        self.features = torch.zeros(size, dim, device=device)
        self.logits = torch.zeros(size, num_logits, device=device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)
        self.pointer = 0

    def push(self, features, labels, logits):
        """Enqueue rows (oldest entries are overwritten first); keeps only the last ``size`` rows."""
        size = self.labels.shape[0]
        features, labels, logits = features[-size:], labels[-size:], logits[-size:]
        slots = (self.pointer + torch.arange(len(labels), device=self.labels.device)) % size
        self.features[slots] = features.to(self.features.dtype)
        self.logits[slots] = logits.to(self.logits.dtype)
        self.labels[slots] = labels
        self.pointer = (self.pointer + len(labels)) % size

    def state_dict(self):
        return {"features": self.features.cpu(), "logits": self.logits.cpu(), "labels": self.labels.cpu(),
                "pointer": self.pointer}

    def load_state_dict(self, state):
        for name in ("features", "logits", "labels"):
            saved = state[name]
            require(saved.shape == getattr(self, name).shape,
                    f"NCCL queue in the checkpoint has {name} of shape {tuple(saved.shape)}, expected "
                    f"{tuple(getattr(self, name).shape)} (queue_size, embedding_size and process count must match)")
            getattr(self, name).copy_(saved)
        self.pointer = int(state["pointer"])


class NCCL(Method):
    """``L = L_cls + l1_gradient_scale·alpha·l1 + beta·l2``; keys ``old_embedding``, ``queue_size``, ``alpha``,
    ``beta``, ``temperature``, ``l1_gradient_scale``, ``l2_gradient``, ``mask_empty_slots`` and optionally
    ``credible_old_feature``.
    The queue is method state."""

    name = "NCCL"

    def setup(self, ctx):
        cfg = ctx.cfg
        require_keys(cfg, self.name, "old_embedding", "queue_size", "alpha", "beta", "temperature",
                     "l1_gradient_scale", "l2_gradient", "mask_empty_slots")
        global_batch = cfg.batch_size * ctx.dist.world_size
        require(cfg.queue_size >= global_batch,
                f"config {cfg.config_path}: queue_size {cfg.queue_size} is smaller than the global batch "
                f"{global_batch}")
        require(cfg.temperature > 0, f"config {cfg.config_path}: temperature must be positive, got {cfg.temperature}")
        self.old = open_features(ctx)
        self.mask = open_mask(ctx) if cfg.get("credible_old_feature") else None
        self.queue = OldFeatureQueue(cfg.queue_size, cfg.embedding_size, ctx.classifier.num_local, ctx.device)

    def per_image_arrays(self):
        return {array.key: array for array in (self.old, self.mask) if array is not None}

    def compute_loss(self, embeddings, labels, indices, ctx):
        cfg = ctx.cfg
        rank, world = ctx.dist.rank, ctx.dist.world_size
        batch = embeddings.shape[0]
        old = F.normalize(self.old.rows(indices, ctx))
        anchors = None if self.mask is None else self.mask.rows(indices, ctx).to(ctx.device, non_blocking=True)
        with torch.no_grad():
            all_old, all_labels = all_gather_rows(old), all_gather_rows(labels)
            all_old_logits = ctx.classifier.logits(all_old)
            if anchors is None:
                self.queue.push(all_old, all_labels, all_old_logits)
            else:   # credible filtering: how many rows to enqueue is read on the host (one sync per step)
                keep = all_gather_rows(anchors.to(torch.uint8)).nonzero().squeeze(1)
                self.queue.push(all_old[keep], all_labels[keep], all_old_logits[keep])
        cls = ctx.classifier(embeddings, labels)
        weights = consensus_weights(old, self.queue.features)
        l1 = consensus_contrastive_loss(F.normalize(embeddings) @ self.queue.features.t(), labels,
                                        self.queue.labels, weights, cfg.temperature, anchors, cfg.mask_empty_slots)
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(cfg.l2_gradient)):
            new_logits = ctx.classifier.logits(AllGatherRows.apply(embeddings))
            scores = SumOverRanks.apply(new_logits @ self.queue.logits.t(), world)[rank * batch:(rank + 1) * batch]
            l2 = consensus_contrastive_loss(scores, labels, self.queue.labels, weights, cfg.temperature, anchors,
                                            cfg.mask_empty_slots)
        loss = cls + cfg.l1_gradient_scale * cfg.alpha * l1 + cfg.beta * l2
        return loss, {"cls": cls.detach(), "l1": l1.detach(), "l2": l2.detach()}

    def state_dict(self):
        return {"queue": self.queue.state_dict()}

    def load_state_dict(self, state):
        if "queue" in state:
            self.queue.load_state_dict(state["queue"])
