"""Partial FC: a class-sharded (model-parallel) classifier with distributed softmax cross entropy.

An et al., "Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition
CNNs by Partial FC", CVPR 2022. Rank r of W holds the C//W (+1 if r < C%W) consecutive classes
starting at ``class_start``. Each step the embeddings and labels of all ranks are gathered, every
rank computes its shard of the logits, and the softmax cross entropy over all C classes is formed
with a max and a sum all-reduce, so no rank ever holds the full N × C logits.

Gradient convention (as insightface, for a DDP-wrapped backbone): the loss value is the mean over
the global batch, the classifier shard receives the exact gradient of that mean, and the gradient
returned to each rank's embeddings is ``world_size`` times the exact one — i.e. that of the
rank's own-batch mean, which DDP's gradient averaging turns into the exact global gradient.
"""
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from losses.margin import CombinedMarginLoss
from utils.distributed import all_gather_rows, all_reduce, world
from utils.errors import UserError


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient over ranks and returns this rank's slice
    multiplied by the world size (see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.batch = tensor.shape[0]
        return all_gather_rows(tensor)

    @staticmethod
    def backward(ctx, grad):
        rank, size = world()
        if size == 1:
            return grad
        grad = all_reduce(grad.contiguous(), dist.ReduceOp.SUM)
        return grad[rank * ctx.batch:(rank + 1) * ctx.batch] * size


class _DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Mean softmax cross entropy over class-sharded logits (fp32).

    ``logits``: N × C_local, this rank's columns of the N × C logits; ``labels``: N, the column of
    the target class in this shard or -1 when it lives on another rank. Per row,
    ``loss = max + log Σ_c exp(z_c − max) − z_y`` with max, Σ and z_y all-reduced over ranks;
    backward gives ``(softmax − onehot) / N``.
    """

    @staticmethod
    def forward(ctx, logits, labels):
        in_shard = (labels != -1).unsqueeze(1)
        columns = labels.clamp(min=0).unsqueeze(1)
        row_max = all_reduce(logits.max(dim=1, keepdim=True)[0], dist.ReduceOp.MAX)
        probs = (logits - row_max).exp_()
        row_sum = all_reduce(probs.sum(dim=1, keepdim=True), dist.ReduceOp.SUM)
        probs.div_(row_sum)
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        target = torch.where(in_shard, logits.gather(1, columns), zero)
        target = all_reduce(target, dist.ReduceOp.SUM)
        loss = (row_max + row_sum.log() - target).mean()
        ctx.save_for_backward(probs, in_shard, columns)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, in_shard, columns = ctx.saved_tensors
        grad = probs.scatter_add(1, columns, -in_shard.to(probs.dtype))
        return grad * (grad_loss / probs.shape[0]), None


class PartialFC(nn.Module):
    """Sharded classifier + loss: ``loss = pfc(local_embeddings, local_labels)``.

    ``margin_loss``: a callable (e.g. :class:`~losses.margin.CombinedMarginLoss`) applied to the
    cosine logits of L2-normalised embeddings and class centres; ``None`` gives a plain linear
    classifier ``x·Wᵀ + b`` (no normalisation, no scale, sharded bias) trained with softmax cross
    entropy — the softmax old model. ``sample_rate`` < 1: each step uses, per rank, the centres of
    all classes present in the global batch plus random others up to ``max(1,
    int(sample_rate·num_local))`` (only those rows get a gradient). Logits and the loss are
    computed in fp32 unless ``autocast_logits`` is set (see :meth:`_shard_logits`). The module must
    not be wrapped in DDP (it is model-parallel).
    ``check_inputs`` (default True) checks batch sizes and labels on every call; the training loop,
    which has checked every label of the data set and drops the last partial batch, turns it off.
    """

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0):
        super().__init__()
        self.rank, self.world_size = world()
        if margin_loss is not None and not callable(margin_loss):
            raise UserError(f"PartialFC margin_loss must be callable or None, got {type(margin_loss).__name__}")
        if not _is_int(num_classes) or num_classes < self.world_size:
            raise UserError(f"num_classes must be an integer >= the number of processes ({self.world_size}), "
                            f"got {num_classes!r}")
        if not _is_int(embedding_size) or embedding_size < 1:
            raise UserError(f"embedding_size must be a positive integer, got {embedding_size!r}")
        num_classes, embedding_size = int(num_classes), int(embedding_size)
        if not 0.0 < sample_rate <= 1.0:
            raise UserError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.margin_loss = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        base, extra = divmod(num_classes, self.world_size)
        self.num_local = base + int(self.rank < extra)
        self.class_start = base * self.rank + min(self.rank, extra)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        self.bias = nn.Parameter(torch.zeros(self.num_local)) if margin_loss is None else None
        # Each forward checks that every process has the same batch size and every label lies in
        # [0, num_classes); both wait for the device. A caller that guarantees both sets this False.
        self.check_inputs = True
        self.autocast_logits = None  # the training loop sets torch.float16 under AMP with amp_logits (published)

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, sample_rate={self.sample_rate}")

    def _shard_logits(self, embeddings, weight, bias):
        """fp32 logits of ``embeddings`` against the given centres (cosine, or linear + bias). With
        ``autocast_logits`` (a dtype) the cosine product runs under autocast in it, as the published
        Partial FC under AMP, and is cast back to fp32."""
        with torch.autocast(embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            if self.margin_loss is None:
                return F.linear(embeddings, weight.float(), bias.float())
            embeddings, weight = F.normalize(embeddings), F.normalize(weight.float())
        amp = {"dtype": self.autocast_logits} if self.autocast_logits is not None else {"enabled": False}
        with torch.autocast(embeddings.device.type, **amp):
            logits = F.linear(embeddings, weight)
        return logits.float().clamp(-1, 1)

    def logits(self, embeddings):
        """This rank's N × num_local logits of ``embeddings`` (cosine in margin mode): no margin, no sampling."""
        self._check_embeddings(embeddings)
        return self._shard_logits(embeddings, self.weight, self.bias)

    def _check_embeddings(self, embeddings):
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise UserError(f"PartialFC expects embeddings of shape (N, {self.embedding_size}), "
                            f"got {tuple(embeddings.shape)}")

    def _sample(self, local_labels):
        """Sorted indices of the centres used this step and the labels remapped into them.

        One host sync: the count of positive centres, which decides whether negatives are drawn (masks
        instead of boolean indexing and ``unique`` for the rest)."""
        in_shard = local_labels != -1
        present = torch.zeros(self.num_local + 1, dtype=torch.bool, device=local_labels.device)
        present = present.index_fill_(0, torch.where(in_shard, local_labels, self.num_local), True)[:self.num_local]
        positives = int(present.sum())
        if positives >= self.num_sample:
            index = torch.topk(present.to(torch.uint8), k=positives)[1].sort()[0]
        else:
            score = torch.rand(self.num_local, device=local_labels.device)
            index = torch.topk(torch.where(present, 2.0, score), k=self.num_sample)[1].sort()[0]
        remapped = torch.where(in_shard, torch.searchsorted(index, local_labels.clamp(min=0)), -1)
        return index, remapped

    def forward(self, local_embeddings, local_labels):
        """Mean loss over the global batch (identical on every rank); see the class docstring."""
        self._check_embeddings(local_embeddings)
        local_labels = local_labels.reshape(-1).long()
        if local_labels.shape[0] != local_embeddings.shape[0]:
            raise UserError(f"PartialFC got {local_embeddings.shape[0]} embeddings but {local_labels.shape[0]} labels")
        if self.check_inputs and self.world_size > 1:
            sizes = all_gather_rows(torch.tensor([local_labels.shape[0]], device=local_labels.device))
            if (sizes != sizes[0]).any():
                raise UserError(f"PartialFC needs the same batch size on every process, got {sizes.tolist()} "
                                "(use drop_last=True)")
        labels = all_gather_rows(local_labels)
        if self.check_inputs:
            invalid = (labels < 0) | (labels >= self.num_classes)
            if invalid.any():
                bad = labels[invalid][0].item()
                raise UserError(f"label {bad} is outside [0, {self.num_classes}) (num_classes of the classifier)")
        embeddings = AllGatherRows.apply(local_embeddings.float())

        in_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local = torch.where(in_shard, labels - self.class_start, torch.full_like(labels, -1))
        weight, bias = self.weight, self.bias
        if self.sample_rate < 1.0:
            index, local = self._sample(local)
            weight = weight[index]
            bias = bias[index] if bias is not None else None
        logits = self._shard_logits(embeddings, weight, bias)
        if self.margin_loss is not None:
            logits = self.margin_loss(logits, local)
        return _DistSoftmaxCrossEntropy.apply(logits, local)


def arcface_classifier(cfg):
    """The Partial FC of a margin-softmax training config: ``CombinedMarginLoss(scale, *margin_list,
    interclass_filtering_threshold)`` over ``embedding_size``/``num_classes``/``sample_rate``."""
    margin = CombinedMarginLoss(cfg.scale, *cfg.margin_list, cfg.interclass_filtering_threshold)
    return PartialFC(margin, cfg.embedding_size, cfg.num_classes, cfg.sample_rate)


class LinearSoftmaxHead(nn.Linear):
    """The published softmax old model's head: ``nn.Linear(embedding_size, num_classes)`` with bias and
    PyTorch's default initialisation, full softmax cross entropy on fp32 logits (outside autocast).

    Every process holds it whole (``replicated``: the training loop broadcasts it and averages its
    gradients) and it is clipped to one gradient norm with the backbone (``clip_with_backbone``), as
    the published head that lived inside the backbone. It is not saved in ``model.pt``.
    """

    replicated = True
    clip_with_backbone = True

    def __init__(self, embedding_size, num_classes):
        super().__init__(embedding_size, num_classes)
        self.check_inputs = True

    def forward(self, embeddings, labels):
        labels = labels.reshape(-1).long()
        if self.check_inputs and bool(((labels < 0) | (labels >= self.out_features)).any()):
            bad = labels[(labels < 0) | (labels >= self.out_features)][0].item()
            raise UserError(f"label {bad} is outside [0, {self.out_features}) (num_classes of the classifier)")
        with torch.autocast(embeddings.device.type, enabled=False):
            logits = F.linear(embeddings.float(), self.weight, self.bias)
        return F.cross_entropy(logits, labels)


SOFTMAX_HEADS = ("linear", "partial_fc")


def softmax_classifier(cfg):
    """The classifier of a plain softmax training config (``softmax_head``): ``"linear"``, the published
    :class:`LinearSoftmaxHead`; ``"partial_fc"``, a Partial FC linear classifier (weights N(0, 0.01),
    zero bias, not clipped, ``sample_rate`` honoured)."""
    head = cfg.get("softmax_head", "linear")
    if head not in SOFTMAX_HEADS:
        raise UserError(f"config {cfg.get('config_path', '')}: softmax_head '{head}' is not supported "
                        f"(expected {' or '.join(SOFTMAX_HEADS)})")
    if head == "partial_fc":
        return PartialFC(None, cfg.embedding_size, cfg.num_classes, cfg.sample_rate)
    if cfg.sample_rate != 1.0:
        raise UserError(f"config {cfg.get('config_path', '')}: sample_rate {cfg.sample_rate} needs "
                        "softmax_head = 'partial_fc' (the published linear head uses every class)")
    return LinearSoftmaxHead(cfg.embedding_size, cfg.num_classes)
