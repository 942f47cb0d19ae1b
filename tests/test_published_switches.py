"""Each difference from the published code (docs/methods.md) in both settings, against hand computations.

The default of every switch reproduces the published code; the other setting is the corrected one.
"""
import importlib
import importlib.util
import math
import os
import types

from easydict import EasyDict as edict
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from BCT_methods.AdvBCT.losses import AdvBCT, Discriminator, adversarial_loss, point_to_set_loss
from BCT_methods.NCCL.losses import NCCL, OldFeatureQueue, consensus_contrastive_loss
from BCT_methods.UniBCT.losses import refine_prototypes
from tests.helpers import ROOT
from tests.test_methods import fake_ctx
from utils.errors import UserError
from utils.scenarios import feature_path, parse_sd, scenario_of
from utils.schedule import lr_multiplier, run_multiplier
from backbones import build_backbone
from losses import ArcFace, LinearSoftmaxHead, PartialFC, softmax_classifier
from utils.config import get_config
from utils.trainer import Method, TrainState, build_models, optimizer_step

WORLD = 2


def _base(method):
    return importlib.import_module(f"BCT_methods.{method}.configs.base").config


def test_defaults_are_the_published_settings():
    adv, uni, nccl = _base("AdvBCT"), _base("UniBCT"), _base("NCCL")
    assert (adv.discriminator_joint_batch, adv.p2s_average, adv.clip_extra_modules) == (False, "violating", True)
    assert (uni.refine_softmax, uni.refine_normalize) == ("column", False)
    assert (nccl.l2_gradient, nccl.l1_gradient_scale, nccl.mask_empty_slots) == (False, 8.0, False)
    assert _base("BCT").warmup_epoch == _base("UniBCT").warmup_epoch == -1


# AdvBCT ------------------------------------------------------------------------------------------

def test_published_discriminator_sees_two_batchnorm_batches():
    torch.manual_seed(0)
    disc = Discriminator(4, hidden=6)
    new, old = F.normalize(torch.randn(5, 4)), F.normalize(torch.randn(3, 4))
    separate = -disc(new)[:, 0].mean() - disc(old)[:, 1].mean()
    joint = disc(torch.cat([new, old]))
    together = -joint[:5, 0].mean() - joint[5:, 1].mean()
    assert adversarial_loss(disc, new, old, 0.5).item() == pytest.approx(separate.item(), abs=1e-6)
    assert adversarial_loss(disc, new, old, 0.5, joint_batch=True).item() == pytest.approx(together.item(), abs=1e-6)
    assert abs(separate.item() - together.item()) > 1e-3


def test_published_discriminator_cannot_see_a_shift_and_stays_at_chance():
    """Old = 3·new + 0.5: each group's own BatchNorm hides the shift, so D outputs the same for both and the
    loss never goes below 2·ln 2; one joint batch lets D learn the difference."""
    losses = {}
    for joint in (False, True):
        torch.manual_seed(1)
        disc = Discriminator(4, hidden=16)
        optimizer = torch.optim.SGD(disc.parameters(), lr=1.0)
        new = torch.randn(64, 4)
        for _ in range(20):
            loss = adversarial_loss(disc, new, 3 * new + 0.5, 0.0, joint_batch=joint)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[joint] = loss.item()
    assert losses[False] >= 2 * math.log(2) - 1e-4
    assert losses[True] < 0.5


def test_point_to_set_average_violating_or_all():
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0]])
    centres = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.6, 0.8], [0.0, 1.0]])
    radii, valid = torch.tensor([0.3, 0.1, 0.1, 0.2]), torch.tensor([True, True, False, True])
    # penalties: 0.7, 0.4, (row 2 invalid), 0 (inside its boundary)
    assert point_to_set_loss(new, centres, radii, valid, "violating").item() == pytest.approx((0.7 + 0.4) / 2)
    assert point_to_set_loss(new, centres, radii, valid, "all").item() == pytest.approx((0.7 + 0.4 + 0.0) / 3)
    inside = point_to_set_loss(new[3:], centres[3:], radii[3:], valid[3:], "violating")
    assert inside.item() == 0.0


@pytest.mark.parametrize("joint_clip", [True, False])
def test_clip_extra_modules_with_the_backbone(tmp_path, joint_clip):
    ctx, *_ = fake_ctx(tmp_path, threshold=0.4, p2s_weight=4.0, adv_weight=4.0, discriminator_hidden=5,
                       discriminator_joint_batch=False, p2s_average="violating", clip_extra_modules=joint_clip)
    method = AdvBCT(ctx.cfg)
    method.setup(ctx)
    extra = method.clipped_with_backbone()
    expected = [*method.boundary.parameters(), *method.discriminator.parameters()] if joint_clip else []
    assert len(extra) == len(expected) and all(a is b for a, b in zip(extra, expected))
    # one backbone and one extra parameter with gradients 3 and 4: the joint norm is 5
    backbone, module = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([backbone, module], lr=1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    clipped = [backbone, module] if joint_clip else [backbone]
    optimizer_step((3 * backbone + 4 * module).sum(), optimizer, scaler, clipped, clip_grad=1.0)
    expected_step = (-0.6, -0.8) if joint_clip else (-1.0, -4.0)
    assert (backbone.item(), module.item()) == pytest.approx(expected_step, abs=1e-6)


# UniBCT ------------------------------------------------------------------------------------------

def _refine_direct(new, old, lam, tau, axis):
    """Π·O averaged over rows with A = softmax(S) over ``axis`` (0: columns, as published), float64."""
    unit = new / np.linalg.norm(new, axis=1, keepdims=True)
    scores = unit @ unit.T / tau
    np.fill_diagonal(scores, -np.inf)
    affinity = np.exp(scores - scores.max(axis=axis, keepdims=True))
    affinity /= affinity.sum(axis=axis, keepdims=True)
    return ((1 - lam) * np.linalg.inv(np.eye(len(new)) - lam * affinity) @ old).mean(axis=0)


def test_published_refinement_is_the_plain_class_mean():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 0, 2, 0, 1, 0, 1, 1])
    new, old = rng.normal(size=(9, 5)), 12 * rng.normal(size=(9, 5))
    published = refine_prototypes(new, old, labels, 3, 0.9, 0.05, normalize=False, softmax="column").numpy()
    corrected = refine_prototypes(new, old, labels, 3, 0.9, 0.05, normalize=True, softmax="row").numpy()
    for c in range(3):
        rows = labels == c
        mean = old[rows].mean(axis=0)
        np.testing.assert_allclose(published[c], mean, rtol=1e-4, atol=1e-4)  # not normalised: ‖μ‖ ≫ 1
        if c != 2:  # class 2 has one image: its old feature
            np.testing.assert_allclose(published[c], _refine_direct(new[rows], old[rows], 0.9, 0.05, 0), rtol=1e-4,
                                       atol=1e-4)
            row = _refine_direct(new[rows], old[rows], 0.9, 0.05, 1)
            np.testing.assert_allclose(corrected[c], row / np.linalg.norm(row), rtol=1e-4, atol=1e-5)
            assert np.abs(corrected[c] - mean / np.linalg.norm(mean)).max() > 1e-3
    assert np.linalg.norm(published, axis=1).min() > 5


def test_refine_softmax_key_is_checked(tmp_path):
    from BCT_methods.UniBCT.losses import UniBCT

    ctx, *_ = fake_ctx(tmp_path, loss_weight=1.0, refine_epochs=(2,), refine_lambda=0.9, refine_tau=0.05,
                       refine_softmax="rows", refine_normalize=False)
    with pytest.raises(UserError, match="refine_softmax must be 'row' or 'column'"):
        UniBCT(ctx.cfg).setup(ctx)


def test_published_step_decay_matches_the_step_schedule():
    """The published loop: StepLR(step_size=1, gamma=0.1) stepped after each epoch e with e + 1 in [20, 26, 32]."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    published = []
    for epoch in range(35):
        published.append(scheduler.get_last_lr()[0])
        optimizer.step()
        if epoch + 1 in (20, 26, 32):
            scheduler.step()
    ours = [0.1 * lr_multiplier(epoch * 10, 350, 0, "step", 2.0, 10, (20, 26, 32)) for epoch in range(35)]
    np.testing.assert_allclose(published, ours, rtol=1e-9)
    assert published[19] == pytest.approx(0.1) and published[20] == pytest.approx(0.01)
    assert published[32] == pytest.approx(1e-4)


# Old softmax model's head -------------------------------------------------------------------------

def _softmax_cfg(**keys):
    return edict(dict(dict(config_path="old.py", embedding_size=4, num_classes=3, sample_rate=1.0), **keys))


def test_published_softmax_head_is_a_default_linear_layer_in_fp32():
    assert importlib.import_module("configs.base").config.softmax_head == "linear"
    torch.manual_seed(3)
    head = softmax_classifier(_softmax_cfg())
    torch.manual_seed(3)
    reference = nn.Linear(4, 3)  # PyTorch's default initialisation, bias included
    assert isinstance(head, LinearSoftmaxHead) and head.replicated and head.clip_with_backbone
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    assert float(head.bias.detach().abs().min()) > 0 and float(head.weight.detach().abs().max()) <= 0.5  # U(±1/√4)
    embeddings, labels = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.0, 3.0]]), torch.tensor([2, 0])
    logits = embeddings.double() @ head.weight.double().t() + head.bias.double()
    expected = (torch.logsumexp(logits, 1) - logits[[0, 1], labels]).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head's logits stay fp32 under autocast
        loss = head(embeddings.bfloat16(), labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), abs=1e-2)  # inputs rounded to bf16 only
    assert head(embeddings, labels).item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(UserError, match=r"label 3 is outside \[0, 3\)"):
        head(embeddings, torch.tensor([3, 0]))
    with pytest.raises(UserError, match="sample_rate 0.5 needs softmax_head = 'partial_fc'"):
        softmax_classifier(_softmax_cfg(sample_rate=0.5))
    with pytest.raises(UserError, match="softmax_head 'mlp' is not supported"):
        softmax_classifier(_softmax_cfg(softmax_head="mlp"))


@pytest.mark.parametrize("head", ["linear", "partial_fc"])
def test_softmax_head_is_clipped_with_the_backbone_only_as_published(head):
    classifier = softmax_classifier(_softmax_cfg(softmax_head=head))
    backbone = nn.Linear(2, 4)
    state = TrainState(edict(), None, classifier=classifier, plain_backbone=backbone, method=Method(edict()))
    clipped = [*backbone.parameters(), *classifier.parameters()] if head == "linear" else [*backbone.parameters()]
    assert len(state.clipped_params) == len(clipped) and all(a is b for a, b in zip(state.clipped_params, clipped))
    if head == "partial_fc":
        assert isinstance(classifier, PartialFC) and float(classifier.bias.detach().abs().max()) == 0.0
        assert float(classifier.weight.detach().std()) < 0.05  # N(0, 0.01)


# Precision -----------------------------------------------------------------------------------------

def _backbone_cfg(network, backbone_amp):
    return edict(config_path="c.py", network=network, embedding_size=8, dropout=0.0, network_width=8, input_size=32,
                 backbone_amp=backbone_amp)


@pytest.mark.parametrize("network, head", [("r18", "fc"), ("mbf", "conv_sep")])
@pytest.mark.parametrize("backbone_amp", ["body", "all"])
def test_backbone_amp_body_runs_the_final_layers_in_fp32(network, head, backbone_amp):
    torch.manual_seed(0)
    model = build_backbone(_backbone_cfg(network, backbone_amp)).eval()
    seen = {}
    getattr(model, head).register_forward_hook(lambda m, inputs, out: seen.update(inp=inputs[0].dtype, out=out.dtype))
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    half = backbone_amp == "all"
    assert model.fp32_head == (not half)
    assert (seen["inp"], seen["out"], out.dtype) == ((torch.bfloat16,) * 3 if half else (torch.float32,) * 3)
    np.testing.assert_allclose(out.float().detach().numpy(), model(images).detach().numpy(), atol=0.1)


def test_backbone_amp_key_is_checked_and_defaults_are_the_published_ones():
    with pytest.raises(UserError, match="backbone_amp 'fp16' is not supported"):
        build_backbone(_backbone_cfg("r18", "fp16"))
    base = importlib.import_module("configs.base").config
    assert (base.backbone_amp, base.amp_logits, base.amp_growth_interval) == ("body", True, 100)
    for method in ("MixBCT", "NCCL", "L2"):
        assert _base(method).backbone_amp == "none"
    arc = get_config(os.path.join(ROOT, "configs", "f512_r18_arc_class30.py"))
    independent = get_config(os.path.join(ROOT, "configs", "f512_r50_arc_data100.py"))
    softmax = get_config(os.path.join(ROOT, "configs", "f128_r18_softmax_class30.py"))
    assert (arc.backbone_amp, independent.backbone_amp, softmax.backbone_amp) == ("none", "none", "body")


def test_partial_fc_logits_under_autocast_as_published():
    torch.manual_seed(1)
    pfc = PartialFC(ArcFace(), 6, 5)
    embeddings = torch.randn(4, 6)
    unit_e, unit_w = F.normalize(embeddings), F.normalize(pfc.weight.detach())
    exact = (unit_e.double() @ unit_w.double().t()).clamp(-1, 1)
    fp32 = pfc.logits(embeddings).detach()
    assert fp32.dtype == torch.float32 and torch.allclose(fp32.double(), exact, atol=1e-6)
    pfc.autocast_logits = torch.bfloat16  # on CUDA the training loop sets torch.float16
    low = pfc.logits(embeddings).detach()
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, F.linear(unit_e.bfloat16(), unit_w.bfloat16()).float().clamp(-1, 1))
    assert 1e-4 < float((low.double() - exact).abs().max()) < 2e-2  # bf16 rounding of the cosine product


def test_build_models_sizes_the_scaler_and_leaves_cpu_logits_in_fp32(tmp_path, monkeypatch):
    cfg = get_config(os.path.join(ROOT, "configs", "f512_r18_arc_class30.py"))
    cfg.update(embedding_size=8, network_width=8, input_size=32, num_classes=5, num_image=40, batch_size=4,
               amp_growth_interval=37)
    made = {}
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kw: made.update(kw) or nn.Module())
    info = types.SimpleNamespace(device=torch.device("cpu"), world_size=1)
    state = build_models(TrainState(cfg, info, steps_per_epoch=10), Method(cfg), build_backbone,
                         lambda c: PartialFC(ArcFace(), 8, 5))
    assert made == {"enabled": False, "growth_interval": 37}  # AMP (and so the scaler) is off on the CPU
    assert state.classifier.autocast_logits is None


# Learning-rate schedule ----------------------------------------------------------------------------

def _lrs(cfg, steps_per_epoch, global_batch, steps):
    """Learning rates the optimiser steps 0..steps-1 use under LambdaLR(run_multiplier(...))."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, run_multiplier(cfg, steps_per_epoch, global_batch))
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


def _schedule_cfg(**keys):
    return edict(dict(dict(num_image=100, num_epoch=35, warmup_epoch=0, lr_schedule="poly", lr_power=2.0,
                           lr_steps=()), **keys))


def test_published_warmup_minus_one_scales_the_poly_schedule():
    """num_image 100, global batch 10: S = 10 steps per epoch, T = 350 steps, warm-up −1 epoch = −10 steps;
    the published PolyScheduler gives lr_k = 0.1·(1 − (k + 10)/360)² = 0.1·((350 − k)/360)²."""
    rates = _lrs(_schedule_cfg(warmup_epoch=-1), 10, 10, 350)
    for step, expected in [(0, 0.1 * (350 / 360) ** 2), (1, 0.1 * (349 / 360) ** 2), (175, 0.1 * (175 / 360) ** 2),
                           (349, 0.1 * (1 / 360) ** 2)]:
        assert rates[step] == pytest.approx(expected, rel=1e-12)
    assert rates[0] == pytest.approx(0.1 * 0.9452160493827161, rel=1e-12)  # (35/36)² of the base rate
    plain = _lrs(_schedule_cfg(warmup_epoch=0), 10, 10, 350)
    assert plain[0] == 0.1 and plain[175] == pytest.approx(0.1 * 0.25)
    np.testing.assert_allclose(rates, plain * (35 / 36) ** 2, rtol=1e-12)
    step_cfg = dict(lr_schedule="step", lr_steps=(20, 26, 32))
    np.testing.assert_array_equal(_lrs(_schedule_cfg(warmup_epoch=-1, **step_cfg), 10, 10, 350),
                                  _lrs(_schedule_cfg(**step_cfg), 10, 10, 350))  # UniBCT's step decay: no effect


def test_poly_horizon_comes_from_num_image():
    """Published MixBCT OPclass: num_image above the data's count. 120 images / batch 10 → a 420-step
    horizon while the data gives 10 steps per epoch (350 trained): the last step is at (1 − 349/420)²."""
    rates = _lrs(_schedule_cfg(num_image=120), 10, 10, 350)
    assert rates[349] == pytest.approx(0.1 * (71 / 420) ** 2, rel=1e-12)
    assert rates[100] == pytest.approx(0.1 * (320 / 420) ** 2, rel=1e-12)
    # fewer images than the data: the published formula rises again past its horizon, (t − 1)²
    assert lr_multiplier(110, 100) == pytest.approx(0.01)
    with pytest.raises(UserError, match="num_image = 5 is fewer than one global batch"):
        run_multiplier(_schedule_cfg(num_image=5), 10, 10)


# NCCL --------------------------------------------------------------------------------------------

def _nccl_gradients(tmp_path, l2_gradient, scale):
    tmp_path.mkdir()
    ctx, *_ = fake_ctx(tmp_path, queue_size=16, alpha=1.0, beta=0.5, temperature=0.7, credible_old_feature=None,
                       l1_gradient_scale=scale, l2_gradient=l2_gradient)
    method = NCCL(ctx.cfg)
    method.setup(ctx)
    torch.manual_seed(4)
    embeddings = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, parts = method.compute_loss(embeddings, labels, torch.tensor([0, 1, 4, 5, 8, 9]), ctx)
    grads = torch.autograd.grad(loss, [embeddings, ctx.classifier.weight])
    return loss, parts, grads, embeddings, ctx.classifier(embeddings, labels)


def test_published_l2_has_no_gradient_and_l1_weighs_scale_times_alpha(tmp_path):
    loss, parts, grads, embeddings, cls = _nccl_gradients(tmp_path / "published", False, 8.0)
    assert loss.item() == pytest.approx(cls.item() + 8.0 * parts["l1"].item() + 0.5 * parts["l2"].item(), abs=1e-5)
    assert parts["l2"].item() > 0  # computed and logged
    (tmp_path / "check").mkdir()
    ctx, *_ = fake_ctx(tmp_path / "check", queue_size=16, alpha=1.0, beta=0.0, temperature=0.7,
                       credible_old_feature=None, l1_gradient_scale=8.0, l2_gradient=True)
    no_l2 = NCCL(ctx.cfg)
    no_l2.setup(ctx)
    emb = embeddings.detach().clone().requires_grad_()
    loss_no_l2, _ = no_l2.compute_loss(emb, torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 4, 5, 8, 9]), ctx)
    expected = torch.autograd.grad(loss_no_l2, [emb, ctx.classifier.weight])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)  # β·l2 (β = 0.5) adds nothing to any gradient
    _, _, trained, _, _ = _nccl_gradients(tmp_path / "corrected", True, 8.0)
    assert (trained[0] - grads[0]).abs().max() > 1e-4 and (trained[1] - grads[1]).abs().max() > 1e-4


def test_queue_logits_are_fp32():
    queue = OldFeatureQueue(4, 2, 3, torch.device("cpu"))
    queue.push(torch.zeros(2, 2), torch.tensor([0, 1]), torch.full((2, 3), 1e-3, dtype=torch.float16))
    assert queue.logits.dtype == torch.float32 and queue.features.dtype == torch.float32


class _PublishedAllGather(torch.autograd.Function):
    """The published all-gather: backward sums every rank's gradient of this rank's rows, times the world size."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rank, world = dist.get_rank(), dist.get_world_size()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows] * world


def _published_flow(rank, folder):
    """One step of the published NCCL gradient flow on 2 gloo ranks: DDP backbone, gathered embeddings, l1 of this
    rank's slice, and the Partial FC classification loss; saves the backbone gradient of each loss."""
    from losses import ArcFace, PartialFC
    from utils.distributed import cleanup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        data = torch.load(os.path.join(folder, "data.pt"), weights_only=True)
        batch = data["inputs"].shape[0] // WORLD
        mine = slice(rank * batch, (rank + 1) * batch)
        grads = {}
        for name in ("l1", "cls"):
            torch.manual_seed(0)
            backbone = nn.Linear(5, 4)
            ddp = nn.parallel.DistributedDataParallel(backbone)
            embeddings = ddp(data["inputs"][mine])
            if name == "l1":
                gathered = F.normalize(_PublishedAllGather.apply(embeddings))[mine]
                loss = consensus_contrastive_loss(gathered @ data["queue"].t(), data["labels"][mine],
                                                  data["queue_labels"], data["weights"][mine])
            else:
                pfc = PartialFC(ArcFace(), 4, 3)
                with torch.no_grad():
                    pfc.weight.copy_(data["centres"][pfc.class_start:pfc.class_start + pfc.num_local])
                loss = pfc(embeddings, data["labels"][mine])
            loss.backward()
            grads[name] = backbone.weight.grad
        del ddp, embeddings, loss   # DDP's reducer must release the gloo group before cleanup(), not after it
        torch.save(grads, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        cleanup()


def test_published_l1_weighs_world_size_against_the_classification_loss(tmp_path):
    """Against one process holding the whole batch, the published flow gives the classification loss its exact
    gradient and l1 world_size × its gradient: on the published 8 GPUs l1 weighed 8·α."""
    from losses import ArcFace

    g = torch.Generator().manual_seed(7)
    data = {"inputs": torch.randn(8, 5, generator=g), "labels": torch.tensor([0, 1, 2, 0, 1, 1, 2, 0]),
            "queue": F.normalize(torch.randn(10, 4, generator=g)), "queue_labels": torch.tensor([0, 1, 2] * 3 + [0]),
            "weights": torch.rand(8, 10, generator=g), "centres": torch.randn(3, 4, generator=g)}
    torch.save(data, tmp_path / "data.pt")
    torch.multiprocessing.spawn(_published_flow, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference = {}
    for name in ("l1", "cls"):
        torch.manual_seed(0)
        backbone = nn.Linear(5, 4)
        embeddings = backbone(data["inputs"])
        if name == "l1":
            loss = consensus_contrastive_loss(F.normalize(embeddings) @ data["queue"].t(), data["labels"],
                                              data["queue_labels"], data["weights"])
        else:
            logits = F.linear(F.normalize(embeddings), F.normalize(data["centres"])).clamp(-1, 1)
            loss = F.cross_entropy(ArcFace()(logits, data["labels"]), data["labels"])
        loss.backward()
        reference[name] = backbone.weight.grad
    for result in ranks:  # DDP averaged the ranks' gradients, so both ranks hold the same
        torch.testing.assert_close(result["cls"], reference["cls"])
        torch.testing.assert_close(result["l1"], WORLD * reference["l1"])


# Denoising and SD names --------------------------------------------------------------------------

def _denoise_main():
    path = os.path.join(ROOT, "tools", "get_feature", "denoise_credible.py")
    spec = importlib.util.spec_from_file_location("denoise_credible", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _published_mask(features, labels, T, columns):
    """The published rule: rows (and columns) L2-normalised, per class keep the ceil(T·n) nearest to the mean."""
    data = features / np.linalg.norm(features, axis=1, keepdims=True)
    if columns:
        data = data / np.linalg.norm(data, axis=0, keepdims=True)
    mask = np.zeros(len(labels), dtype=np.uint8)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        distances = np.linalg.norm(data[rows] - data[rows].mean(axis=0), axis=1)
        mask[rows[np.argsort(distances, kind="stable")[:math.ceil(T * len(rows))]]] = 1
    return mask


def test_default_denoise_mask_is_the_published_rule_with_column_normalisation(tmp_path):
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 10)
    scales = np.array([20.0, 5.0, 1.0, 0.2, 0.05])  # anisotropic: column normalisation changes the ranking
    features = ((rng.normal(size=(4, 5))[labels] + rng.normal(size=(40, 5))) * scales).astype(np.float32)
    sd = "myrun_class70"  # any name before the split, as the published tools accept
    np.save(tmp_path / f"{sd}_feature.npy", features)
    np.save(tmp_path / f"{sd}_label.npy", labels.astype(np.int64))
    main, out = _denoise_main(), tmp_path / f"{sd}_credible_ratio_60_feature.npy"
    main(["--T", "0.6", "--SD", sd, "--output", str(tmp_path)])
    published = _published_mask(features.astype(np.float64), labels, 0.6, columns=True)
    rows_only = _published_mask(features.astype(np.float64), labels, 0.6, columns=False)
    assert not np.array_equal(published, rows_only)  # the toy set tells the two rules apart
    assert np.array_equal(np.load(out), published)
    main(["--T", "0.6", "--SD", sd, "--output", str(tmp_path), "--column_norm"])
    assert np.array_equal(np.load(out), published)
    main(["--T", "0.6", "--SD", sd, "--output", str(tmp_path), "--no_column_norm"])
    assert np.array_equal(np.load(out), rows_only)


def test_sd_names_as_the_published_tools_take_them():
    assert parse_sd("f512_r100_arc_glint_class70") == (512, "class70")
    assert parse_sd("myrun_class70") == (None, "class70")
    assert parse_sd("128_r18_softmax_data100") == (None, "data100")
    assert scenario_of("myrun_data30") == "OPdata"
    assert feature_path("myrun_class100", "feature", "/x") == "/x/myrun_class100_feature.npy"
    assert feature_path("myrun_class100", "feature").endswith("feature_save/EXclass/myrun_class100_feature.npy")
    for bad in ("class70", "myrun_class50", "my/run_class70", "my run_class70"):
        with pytest.raises(UserError, match="--SD"):
            parse_sd(bad)
