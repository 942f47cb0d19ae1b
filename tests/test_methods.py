"""BCT method loss terms against hand-computed values and direct formulas; old-feature files; configs."""
import glob
import math
import os
import re
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from easydict import EasyDict as edict

from BCT_methods.AdvBCT.losses import (Discriminator, ElasticBoundary, GradientReversal, adversarial_loss,
                                       grl_coefficient, point_to_set_loss)
from BCT_methods.BCT.losses import BCT, influence_loss
from BCT_methods.L2.losses import L2, weakened_l2_loss
from BCT_methods.MixBCT.losses import MixBCT, choose_mixed, mix_embeddings
from BCT_methods.NCCL.losses import NCCL, OldFeatureQueue, consensus_contrastive_loss, consensus_weights
from BCT_methods.UniBCT.losses import UniBCT, propagation_weights, refine_prototypes
from losses import ArcFace, PartialFC
from tests.helpers import ROOT
from utils.config import get_config
from utils.distributed import compute_on_main
from utils.errors import UserError
from utils.old_features import CredibleMask, OldFeatures, load_prototypes, open_features, require_keys


def fake_ctx(tmp_path, num_images=12, num_classes=3, dim=4, batch_size=6, **keys):
    """A TrainState stand-in (one process, CPU) with tiny old-feature files and a real Partial FC."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), num_images // num_classes)
    features = rng.normal(size=(num_images, dim)).astype(np.float32)
    mask = (np.arange(num_images) % 2).astype(np.uint8)
    prototypes = rng.normal(size=(num_classes, dim)).astype(np.float32)
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    for name, array in [("feature", features), ("mask", mask), ("avg", prototypes)]:
        np.save(tmp_path / f"{name}.npy", array)
    cfg = edict(config_path="test.py", embedding_size=dim, batch_size=batch_size, num_epoch=4,
                old_embedding=str(tmp_path / "feature.npy"), credible_old_feature=str(tmp_path / "mask.npy"),
                old_prototype=str(tmp_path / "avg.npy"), mask_empty_slots=False)
    cfg.update(keys)
    torch.manual_seed(0)
    classifier = PartialFC(ArcFace(), dim, num_classes)
    ctx = types.SimpleNamespace(cfg=cfg, classifier=classifier, device=torch.device("cpu"), epoch=0, progress=0.0,
                                dist=types.SimpleNamespace(world_size=1, rank=0),
                                logger=types.SimpleNamespace(info=lambda *a: None),
                                dataset=_Sized(labels))
    return ctx, features, mask, prototypes, labels


class _Sized:
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)


# MixBCT ------------------------------------------------------------------------------------------

def test_mixbct_replaces_exactly_k_credible_rows():
    credible = torch.tensor([True, False, True, True, False, True, False, True])
    for k in range(0, 8):
        for seed in range(5):
            chosen = choose_mixed(credible, k, torch.Generator().manual_seed(seed))
            assert int(chosen.sum()) == min(k, 5)
            assert not bool((chosen & ~credible).any())
    picks = torch.stack([choose_mixed(credible, 2, torch.Generator().manual_seed(s)) for s in range(200)])
    assert bool((picks.float().mean(0)[credible] > 0.25).all())  # every credible row gets drawn


def test_mixbct_draw_is_the_published_uniform_k_subset():
    """With at least k credible rows every k-subset of them is drawn equally often (the published draw's
    distribution); with fewer, all credible rows are taken where the published draw raises ValueError
    (docs/methods.md, differences row 19)."""
    credible = torch.tensor([True, False, True, True, False, True, True])   # 5 credible rows: C(5, 2) = 10 pairs
    draws = 3000
    counts = {}
    for seed in range(draws):
        chosen = choose_mixed(credible, 2, torch.Generator().manual_seed(seed))
        key = tuple(torch.nonzero(chosen).flatten().tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == math.comb(5, 2) and all(all(credible[i] for i in pair) for pair in counts)
    expected = draws / len(counts)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 27.9   # the 0.001 quantile of chi-square with 9 degrees of freedom
    assert torch.equal(choose_mixed(credible, 6, torch.Generator().manual_seed(0)), credible)


def test_mix_embeddings_rows_and_gradients():
    embeddings = torch.randn(4, 3, requires_grad=True)
    chosen = torch.tensor([False, True, False, True])
    old = torch.tensor([[9.0, 9.0, 9.0], [3.0, 0.0, 4.0], [7.0, 7.0, 7.0], [0.0, 2.0, 0.0]])
    mixed = mix_embeddings(embeddings, chosen, old)
    assert torch.allclose(mixed[1], torch.tensor([0.6, 0.0, 0.8]))
    assert torch.allclose(mixed[3], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(mixed[[0, 2]], embeddings[[0, 2]])
    mixed.sum().backward()
    assert torch.equal(embeddings.grad[:, 0], torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_mixbct_method_loss_is_classifier_on_mixed_batch(tmp_path):
    ctx, features, mask, _, labels = fake_ctx(tmp_path, mix_ratio=0.5)
    method = MixBCT(ctx.cfg)
    method.setup(ctx)
    indices = torch.tensor([7, 2, 5, 0, 9, 11])
    embeddings = torch.randn(6, 4)
    torch.manual_seed(3)
    loss, parts = method.compute_loss(embeddings, torch.from_numpy(labels[indices.numpy()]), indices, ctx)
    torch.manual_seed(3)
    chosen = choose_mixed(torch.from_numpy(mask[indices.numpy()] == 1), 3)
    expected = embeddings.clone()
    expected[chosen] = F.normalize(torch.from_numpy(features[indices.numpy()][chosen.numpy()]))
    assert parts["mixed_rows"] == 3.0 and bool((torch.from_numpy(mask[indices.numpy()])[chosen] == 1).all())
    assert torch.allclose(loss, ctx.classifier(expected, torch.from_numpy(labels[indices.numpy()])))


# BCT / UniBCT ------------------------------------------------------------------------------------

def test_bct_influence_loss_hand_computed():
    f = torch.tensor([[3.0, 4.0], [2.0, 0.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    first = -math.log(math.exp(0.6) / (math.exp(0.6) + math.exp(0.8)))
    second = -math.log(math.exp(0.0) / (math.exp(1.0) + math.exp(0.0)))
    assert influence_loss(f, labels, prototypes).item() == pytest.approx((first + second) / 2, abs=1e-6)


def test_bct_method_adds_influence(tmp_path):
    ctx, _, _, prototypes, labels = fake_ctx(tmp_path, loss_weight=0.5)
    method = BCT(ctx.cfg)
    method.setup(ctx)
    embeddings, y = torch.randn(6, 4), torch.from_numpy(labels[:6])
    loss, parts = method.compute_loss(embeddings, y, torch.arange(6), ctx)
    expected = ctx.classifier(embeddings, y) + 0.5 * influence_loss(embeddings, y, torch.from_numpy(prototypes))
    assert torch.allclose(loss, expected) and "influence" in parts


def _refine_numpy(new, old, lam, tau):
    unit = new / np.linalg.norm(new, axis=1, keepdims=True)
    scores = unit @ unit.T / tau
    np.fill_diagonal(scores, -np.inf)
    affinity = np.exp(scores - scores.max(axis=1, keepdims=True))
    affinity /= affinity.sum(axis=1, keepdims=True)
    propagation = (1 - lam) * np.linalg.inv(np.eye(len(new)) - lam * affinity)
    return (propagation @ old).mean(axis=0)


def test_unibct_refinement_matches_direct_per_class_computation():
    rng = np.random.default_rng(1)
    sizes = [5, 1, 3, 5, 8, 3]
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    new = rng.normal(size=(len(labels), 6)).astype(np.float32)
    old = rng.normal(size=(len(labels), 6)).astype(np.float32)
    for normalize in (False, True):
        got = refine_prototypes(new, old, labels, len(sizes), 0.9, 0.5, normalize, max_elements=64).numpy()
        for c in range(len(sizes)):
            rows = labels == c
            if sizes[c] == 1:
                expected = old[rows][0]
            else:
                expected = _refine_numpy(new[rows].astype(np.float64), old[rows], 0.9, 0.5)
            if normalize:
                expected = expected / np.linalg.norm(expected)
            np.testing.assert_allclose(got[c], expected, rtol=1e-4, atol=1e-5)


def test_unibct_lambda_zero_gives_plain_mean_and_rows_sum_to_one():
    rng = np.random.default_rng(2)
    labels = np.array([0, 0, 1, 1, 1, 0, 2, 2])
    new, old = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
    got = refine_prototypes(new, old, labels, 4, lam=0.0, tau=0.05, normalize=False).numpy()
    for c in range(3):
        np.testing.assert_allclose(got[c], old[labels == c].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not got[3].any()  # a class without images stays zero
    assert torch.allclose(propagation_weights(torch.randn(2, 5, 4), 0.9, 0.05).sum(dim=1), torch.ones(2), atol=1e-5)


def test_unibct_influence_weight_and_state(tmp_path):
    ctx, *_ = fake_ctx(tmp_path, loss_weight=1.0, refine_epochs=(2, 3), refine_lambda=0.9, refine_tau=0.05,
                       refine_softmax="row", refine_normalize=True)
    method = UniBCT(ctx.cfg)
    method.setup(ctx)
    weights = []
    for epoch in range(4):
        ctx.epoch = epoch
        weights.append(method.influence_weight(ctx))
    assert weights == [0.0, 0.0, 1.0, 1.0]
    assert method.state_dict() == {"refined": []}
    method.refined, method.prototypes = [2], torch.full((3, 4), 0.5)
    other = UniBCT(ctx.cfg)
    other.setup(ctx)
    other.load_state_dict(method.state_dict())
    assert other.refined == [2] and torch.equal(other.prototypes, method.prototypes)
    ctx.cfg.refine_epochs = (1, 9)
    with pytest.raises(UserError, match="refine_epochs"):
        UniBCT(ctx.cfg).setup(ctx)


# NCCL --------------------------------------------------------------------------------------------

def test_consensus_contrastive_loss_hand_computed():
    scores = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]])
    weights = torch.tensor([[0.5, 1.0, 0.25], [1.0, 0.2, 0.4]])
    labels, queue_labels = torch.tensor([7, 3]), torch.tensor([7, 3, 7])
    log_z0 = math.log(math.e + 1 + math.e ** 2)
    row0 = -(0.5 * (1 - log_z0) + 0.25 * (2 - log_z0)) / 2
    row1 = -(0.2 * (0.5 - math.log(2 * math.e ** 0.5 + 1)))
    got = consensus_contrastive_loss(scores, labels, queue_labels, weights, tau=1.0)
    assert got.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    half = consensus_contrastive_loss(scores * 2, labels, queue_labels, weights, tau=2.0)
    assert half.item() == pytest.approx(got.item(), abs=1e-6)
    # two empty slots: row 1 (label 3) has no positive and is left out of the mean
    published = consensus_contrastive_loss(scores, labels, torch.tensor([7, -1, -1]), weights)
    assert published.item() == pytest.approx(-0.5 * (1 - log_z0), abs=1e-6)  # empty slots stay in the denominator
    masked = consensus_contrastive_loss(scores, labels, torch.tensor([7, -1, -1]), weights, mask_empty=True)
    assert masked.item() == pytest.approx(0.0, abs=1e-6)  # only one slot left: its softmax is 1
    only_second = consensus_contrastive_loss(scores, labels, queue_labels, weights, anchors=torch.tensor([False, True]))
    assert only_second.item() == pytest.approx(row1, abs=1e-6)


def test_queue_is_fifo_and_positives_include_self():
    queue = OldFeatureQueue(5, 2, 3, torch.device("cpu"))
    for start in (0, 3, 6):
        rows = torch.arange(start, start + 3)
        queue.push(rows[:, None].float().repeat(1, 2), rows, rows[:, None].float().repeat(1, 3))
    assert sorted(queue.labels.tolist()) == [4, 5, 6, 7, 8] and queue.pointer == 4
    queue.push(torch.zeros(7, 2), torch.arange(100, 107), torch.zeros(7, 3))  # more than the queue holds
    assert sorted(queue.labels.tolist()) == [102, 103, 104, 105, 106]
    queue = OldFeatureQueue(8, 2, 3, torch.device("cpu"))
    batch = F.normalize(torch.randn(3, 2))
    queue.push(batch, torch.tensor([0, 1, 2]), torch.zeros(3, 3))
    positive = torch.tensor([0, 1, 2])[:, None] == queue.labels[None, :]
    assert bool(positive[torch.arange(3), torch.arange(3)].all())  # each sample's own old feature
    assert torch.allclose(consensus_weights(batch, queue.features)[torch.arange(3), torch.arange(3)], torch.ones(3))


def _nccl_reference(new, old, labels, q_feat, q_logit, q_labels, new_logits, tau, filled_only):
    """Direct per-sample loops of the NCCL formulas (numpy, float64) over every queue slot, or only
    over the filled ones."""
    if filled_only:
        filled = q_labels >= 0
        q_feat, q_logit, q_labels = q_feat[filled], q_logit[filled], q_labels[filled]
    l1 = l2 = 0.0
    for i in range(len(new)):
        pos = np.flatnonzero(q_labels == labels[i])
        w = (1 + old[i] @ q_feat.T) / 2
        for scores, out in ((new[i] @ q_feat.T / tau, 1), (new_logits[i] @ q_logit.T / tau, 2)):
            log_p = scores - np.log(np.exp(scores - scores.max()).sum()) - scores.max()
            value = -(w[pos] * log_p[pos]).sum() / len(pos) / len(new)
            if out == 1:
                l1 += value
            else:
                l2 += value
    return l1, l2


@pytest.mark.parametrize("mask_empty_slots", [False, True])
def test_nccl_method_matches_direct_formulas(tmp_path, mask_empty_slots):
    """12 of the 16 queue slots are filled: the 4 empty ones are in the softmax unless masked."""
    ctx, features, _, _, labels = fake_ctx(tmp_path, queue_size=16, alpha=1.0, beta=0.5, temperature=0.7,
                                           credible_old_feature=None, l1_gradient_scale=1.0, l2_gradient=True,
                                           mask_empty_slots=mask_empty_slots)
    method = NCCL(ctx.cfg)
    method.setup(ctx)
    for indices in ([0, 4, 8, 1, 5, 9], [2, 6, 10, 3, 7, 11]):
        indices = torch.tensor(indices)
        embeddings = torch.randn(6, 4)
        y = torch.from_numpy(labels[indices.numpy()])
        loss, parts = method.compute_loss(embeddings, y, indices, ctx)
    queue = method.queue
    old = F.normalize(torch.from_numpy(features[indices.numpy()])).double().numpy()
    with torch.no_grad():
        new_logits = ctx.classifier.logits(embeddings).double().numpy()
        cls = ctx.classifier(embeddings, y)
    l1, l2 = _nccl_reference(F.normalize(embeddings).double().numpy(), old, y.numpy(), queue.features.double().numpy(),
                             queue.logits.double().numpy(), queue.labels.numpy(), new_logits, 0.7, mask_empty_slots)
    assert parts["l1"].item() == pytest.approx(l1, abs=1e-5) and parts["l2"].item() == pytest.approx(l2, abs=1e-5)
    assert loss.item() == pytest.approx(cls.item() + l1 + 0.5 * l2, abs=1e-5)
    restored = NCCL(ctx.cfg)
    restored.setup(ctx)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.queue.labels, queue.labels) and restored.queue.pointer == queue.pointer


def test_nccl_credible_filter_skips_uncredible_samples(tmp_path):
    ctx, _, mask, _, labels = fake_ctx(tmp_path, queue_size=16, alpha=1.0, beta=0.01, temperature=1.0,
                                       l1_gradient_scale=8.0, l2_gradient=False)
    method = NCCL(ctx.cfg)
    method.setup(ctx)
    indices = torch.tensor([0, 1, 2, 3, 4, 5])
    method.compute_loss(torch.randn(6, 4), torch.from_numpy(labels[:6]), indices, ctx)
    assert int((method.queue.labels >= 0).sum()) == int(mask[:6].sum()) == 3


# L2 ----------------------------------------------------------------------------------------------

def test_weakened_l2_margin():
    new, old = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[0.0, 5.0], [0.0, 1.0]])
    assert weakened_l2_loss(new, old, 0.0).item() == pytest.approx(math.sqrt(2) / 2, abs=1e-6)
    assert weakened_l2_loss(new, old, 0.2).item() == pytest.approx((math.sqrt(2) - 0.2) / 2, abs=1e-6)
    assert weakened_l2_loss(new, old, 1.5).item() == 0.0
    same = torch.tensor([[1.0, 1.0]], requires_grad=True)
    weakened_l2_loss(same, torch.tensor([[2.0, 2.0]]), 0.0).backward()
    assert bool(torch.isfinite(same.grad).all())


def test_l2_method(tmp_path):
    ctx, features, _, _, labels = fake_ctx(tmp_path, loss_weight=10.0, threshold=0.2)
    method = L2(ctx.cfg)
    method.setup(ctx)
    embeddings, indices = torch.randn(6, 4), torch.tensor([3, 1, 0, 2, 5, 4])
    y = torch.from_numpy(labels[indices.numpy()])
    loss, parts = method.compute_loss(embeddings, y, indices, ctx)
    l2 = weakened_l2_loss(embeddings, torch.from_numpy(features[indices.numpy()]), 0.2)
    assert torch.allclose(loss, ctx.classifier(embeddings, y) + 10 * l2) and torch.allclose(parts["l2"], l2)


# AdvBCT ------------------------------------------------------------------------------------------

def test_gradient_reversal_flips_sign():
    x = torch.randn(3, 4, requires_grad=True)
    (GradientReversal.apply(x, 0.3) * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(4.0).expand(3, 4))
    assert grl_coefficient(0.0) == 0.0
    assert grl_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_coefficient(0.1) == pytest.approx(2 / (1 + math.e ** -1) - 1)


def test_elastic_boundary_and_point_to_set():
    boundary = ElasticBoundary(3, threshold=0.4)
    with torch.no_grad():
        boundary.weight.copy_(torch.tensor([0.0, 0.0, math.log(3.0)]))
    radii = torch.tensor([0.2, 0.6, 0.4])
    got = boundary(radii, torch.tensor([0, 1, 2, 0]))
    assert torch.allclose(got, torch.tensor([0.2 + 0.5 * 0.2, 0.6 - 0.5 * 0.2, 0.4, 0.3]))
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    centres = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.6, 0.8]])
    loss = point_to_set_loss(new, centres, torch.tensor([0.3, 0.1, 0.1]), torch.tensor([True, True, False]))
    assert loss.item() == pytest.approx((0.7 + 0.4) / 2)
    assert point_to_set_loss(new, centres, torch.zeros(3), torch.zeros(3, dtype=torch.bool)).item() == 0.0
    boundary(radii, torch.tensor([1])).sum().backward()
    assert boundary.weight.grad[1].item() == pytest.approx(-0.2 * 0.25)  # d/dw of −sigmoid(w)·0.2 at w = 0


def test_adversarial_loss_and_reversed_backbone_gradient():
    torch.manual_seed(0)
    disc = Discriminator(4, hidden=5)
    new = F.normalize(torch.randn(3, 4)).requires_grad_()
    old = F.normalize(torch.randn(2, 4))
    loss = adversarial_loss(disc, new, old, 0.7, joint_batch=True)
    log_p = disc(torch.cat([new, old]))
    expected = -log_p[:3, 0].mean() - log_p[3:, 1].mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    grad_reversed = torch.autograd.grad(loss, new)[0]
    grad_plain = torch.autograd.grad(expected, new)[0]
    assert torch.allclose(grad_reversed, -0.7 * grad_plain, atol=1e-6)


# old-feature files -------------------------------------------------------------------------------

def test_old_feature_validation(tmp_path):
    ctx, features, *_ = fake_ctx(tmp_path)
    old = open_features(ctx)
    indices = torch.tensor([9, 0, 4, 4])
    assert torch.equal(old.gather(indices), torch.from_numpy(features[[9, 0, 4, 4]]))
    cases = [
        (lambda: OldFeatures(str(tmp_path / "nope.npy"), 12, 4), "nope.npy"),
        (lambda: OldFeatures(str(tmp_path / "feature.npy"), 13, 4), "12 rows but the training set has 13"),
        (lambda: OldFeatures(str(tmp_path / "feature.npy"), 12, 8), "dimension 4 but embedding_size is 8"),
        (lambda: load_prototypes(str(tmp_path / "avg.npy"), 5, 4), "3 prototypes but the training set has 5"),
        (lambda: load_prototypes(str(tmp_path / "avg.npy"), 3, 2), "dimension 4"),
        (lambda: CredibleMask(str(tmp_path / "mask.npy"), 11), "mask.npy"),
        (lambda: require_keys(edict(config_path="c.py", mix_ratio=0.3), "MixBCT", "old_embedding", "mix_ratio"),
         "MixBCT needs old_embedding"),
    ]
    np.save(tmp_path / "zeros.npy", np.zeros(12, np.uint8))
    np.save(tmp_path / "twos.npy", np.full(12, 2, np.uint8))
    cases += [(lambda: CredibleMask(str(tmp_path / "zeros.npy"), 12), "no sample as credible"),
              (lambda: CredibleMask(str(tmp_path / "twos.npy"), 12), "only 0/1 values")]
    for make, fragment in cases:
        with pytest.raises(UserError, match=re.escape(fragment)):
            make()
    mask = CredibleMask(str(tmp_path / "mask.npy"), 12)
    assert mask.num_credible == 6 and mask.gather(torch.tensor([1, 2])).tolist() == [True, False]


def test_compute_on_main_single_process():
    out = compute_on_main(lambda: [torch.ones(2), np.zeros((1, 3), np.float32)], torch.device("cpu"))
    assert torch.equal(out[0], torch.ones(2)) and out[1].shape == (1, 3)

    def failing():
        raise UserError("bad statistics")
    with pytest.raises(UserError, match="bad statistics"):
        compute_on_main(failing, torch.device("cpu"))


# configs -----------------------------------------------------------------------------------------

SCENARIOS = {"OPclass": ("train_part_70_class", "class70", 65402), "OPdata": ("train_part_70_data", "data70", 93431),
             "EXclass": ("", "class100", 93431), "EXdata": ("", "data100", 93431)}
COMBOS = ("softmax_to_arc_f128", "softmax_to_arc_f512", "arc_to_arc_f512")
PATH_OF = {"old_embedding": "feature", "old_prototype": "avg_feature",
           "credible_old_feature": "credible_ratio_90_feature"}


def test_every_shipped_config_loads_and_the_matrix_is_complete():
    for method in ("MixBCT", "BCT", "UniBCT", "NCCL", "L2", "AdvBCT"):
        folder = os.path.join(ROOT, "BCT_methods", method, "configs")
        names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(folder, "*_ms1mv3_*.py"))}
        variants = ("L2", "weakenedL2") if method == "L2" else (method,)
        expected = {f"{s}_ms1mv3_r18_to_r50_{v}_{c}" for s in SCENARIOS for v in variants
                    for c in COMBOS + (("softmax_to_arc_f256",) if s == "OPclass" else ())}
        assert names == expected, (method, names ^ expected)
        for name in sorted(names):
            cfg = get_config(os.path.join(folder, name + ".py"))
            fields = name.split("_")
            scenario, old_loss, dim = fields[0], fields[-4], int(fields[-1][1:])
            split, detail, classes = SCENARIOS[scenario]
            if scenario == "OPclass" and method in ("MixBCT", "L2"):
                classes = 93431  # the published MixBCT and L2 OPclass configs kept the OPdata count
            assert cfg.network == "r50" and cfg.embedding_size == dim and cfg.num_classes == classes
            assert cfg.num_epoch == 35 and cfg.batch_size == 128 and cfg.lr == 0.1 and cfg.fp16
            assert cfg.rec == os.path.normpath(os.path.join(ROOT, "dataset/ms1m-retinaface-t1", split))
            sd = f"f{dim}_r18_{old_loss}_{detail}"
            for key, kind in PATH_OF.items():
                if cfg.get(key):
                    assert cfg[key] == os.path.join(ROOT, "feature_save", scenario, f"{sd}_{kind}.npy"), (name, key)
            if method == "L2":
                assert cfg.threshold == (0.2 if "weakenedL2" in name else 0.0) and cfg.loss_weight == 10.0
            if method == "UniBCT":
                assert cfg.lr_schedule == "step" and tuple(cfg.lr_steps) == (20, 26, 32)
                assert tuple(cfg.refine_epochs) == (10, 20)
        demo = get_config(os.path.join(folder, f"demo_{method}.py"))
        assert demo.get("old_embedding") or demo.get("old_prototype")


# --- the masked (host-sync-free) losses against the boolean-indexing form they replace

def _consensus_by_indexing(scores, labels, queue_labels, weights, tau=1.0, anchors=None, mask_empty=False):
    valid = queue_labels >= 0
    logits = (scores / tau).masked_fill(~valid, float("-inf")) if mask_empty else scores / tau
    log_prob = torch.log_softmax(logits, dim=1)
    positive = (labels[:, None] == queue_labels[None, :]) & valid
    count = positive.sum(dim=1)
    per_row = -(weights * log_prob.masked_fill(~positive, 0.0)).sum(dim=1)
    used = count > 0 if anchors is None else (count > 0) & anchors
    if not bool(used.any()):
        return scores.sum() * 0.0
    return (per_row[used] / count[used]).mean()


def _p2s_by_indexing(new, centres, radii, valid, average):
    penalty = torch.relu((new - centres).norm(dim=1) - radii)
    used = valid & (penalty > 0) if average == "violating" else valid
    if not bool(used.any()):
        return penalty.sum() * 0.0
    return penalty[used].mean()


def _value_and_grad(fn, leaf, *args, **kwargs):
    leaf = leaf.detach().clone().requires_grad_()
    value = fn(leaf, *args, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("seed", range(8))
def test_masked_consensus_loss_equals_indexing(seed):
    g = torch.Generator().manual_seed(seed)
    n, q = 6, 10
    scores, weights = torch.randn(n, q, generator=g) * 3, torch.rand(n, q, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    queue_labels = torch.randint(-1, 5, (q,), generator=g)          # −1: empty slots
    anchors = [None, torch.rand(n, generator=g) > 0.5, torch.zeros(n, dtype=torch.bool)][seed % 3]
    for tau in (1.0, 0.3):
        for mask_empty in (False, True):   # published: empty slots in the denominators; True: masked
            got = _value_and_grad(consensus_contrastive_loss, scores, labels, queue_labels, weights, tau, anchors,
                                  mask_empty)
            want = _value_and_grad(_consensus_by_indexing, scores, labels, queue_labels, weights, tau, anchors,
                                   mask_empty)
            assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
            assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-7)
    for mask_empty in (False, True):
        empty = _value_and_grad(consensus_contrastive_loss, scores, labels, torch.full((q,), -1), weights,
                                mask_empty=mask_empty)
        assert empty[0].item() == 0.0 and torch.equal(empty[1], torch.zeros_like(scores))   # no NaN gradient


@pytest.mark.parametrize("seed", range(6))
def test_masked_point_to_set_loss_equals_indexing(seed):
    g = torch.Generator().manual_seed(seed)
    new = torch.nn.functional.normalize(torch.randn(8, 5, generator=g))
    centres = torch.nn.functional.normalize(torch.randn(8, 5, generator=g))
    radii, valid = torch.rand(8, generator=g) * 1.5, torch.rand(8, generator=g) > 0.3
    for average in ("violating", "all"):
        for mask in (valid, torch.zeros_like(valid)):
            got = _value_and_grad(point_to_set_loss, new, centres, radii, mask, average)
            want = _value_and_grad(_p2s_by_indexing, new, centres, radii, mask, average)
            assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
            assert torch.allclose(got[1], want[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(20))
def test_masked_mixing_equals_indexing(seed):
    """The rows drawn and the mixed batch equal the count-then-topk draw and the indexed assignment."""
    g = torch.Generator().manual_seed(seed)
    credible = torch.rand(12, generator=g) > [0.2, 0.7, 0.95, 1.0][seed % 4]
    k = [0, 3, 6, 12][seed % 4 if seed % 5 else 3]
    scores = torch.rand(12, generator=torch.Generator().manual_seed(seed))
    scores = torch.where(credible, scores, torch.full_like(scores, -1.0))
    want = torch.zeros_like(credible)
    want[torch.topk(scores, min(k, int(credible.sum()))).indices] = True
    chosen = choose_mixed(credible, k, torch.Generator().manual_seed(seed))
    assert torch.equal(chosen, want)
    embeddings, old = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    indexed = embeddings.clone()
    indexed[want] = torch.nn.functional.normalize(old[want])
    assert torch.equal(mix_embeddings(embeddings, chosen, old), indexed)
