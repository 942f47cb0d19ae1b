import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from losses import ArcFace, CosFace, PartialFC
from utils.distributed import cleanup
from utils.errors import UserError

WORLD, BATCH, DIM, CLASSES, IN_DIM = 2, 4, 6, 7, 5


def _data():
    """The same global batch and full classifier on every process."""
    g = torch.Generator().manual_seed(1234)
    return {
        "inputs": torch.randn(WORLD * BATCH, IN_DIM, generator=g),
        "emb": torch.randn(WORLD * BATCH, DIM, generator=g),
        "labels": torch.tensor([0, 6, 3, 3, 5, 1, 6, 2]),
        "weight": torch.randn(CLASSES, DIM, generator=g) * 0.5,
        "bias": torch.randn(CLASSES, generator=g),
        "weight20": torch.randn(20, DIM, generator=g),
    }


def _sharded(margin, data, num_classes=CLASSES, sample_rate=1.0, weight_key="weight"):
    pfc = PartialFC(margin, DIM, num_classes, sample_rate)
    rows = slice(pfc.class_start, pfc.class_start + pfc.num_local)
    with torch.no_grad():
        pfc.weight.copy_(data[weight_key][rows])
        if pfc.bias is not None:
            pfc.bias.copy_(data["bias"][rows])
    return pfc


def _reference(margin, emb, labels, weight, bias=None):
    """Single-process loss and gradients, computed without PartialFC."""
    emb = emb.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    if margin is None:
        bias = bias.clone().requires_grad_()
        logits = F.linear(emb, weight, bias)
    else:
        logits = margin(F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1), labels)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), emb.grad, weight.grad, None if bias is None else bias.grad


def _results(rank):
    """Every distributed quantity the tests compare, for this rank."""
    data = _data()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    out = {}
    for name, margin in (("arcface", ArcFace()), ("softmax", None)):
        pfc = _sharded(margin, data)
        emb = data["emb"][mine].clone().requires_grad_()
        loss = pfc(emb, data["labels"][mine])
        loss.backward()
        out[name] = {"loss": loss.detach(), "emb_grad": emb.grad, "weight_grad": pfc.weight.grad,
                     "bias_grad": None if pfc.bias is None else pfc.bias.grad,
                     "class_start": pfc.class_start, "num_local": pfc.num_local}

    torch.manual_seed(0)  # the same replicated "backbone" on both ranks
    backbone = nn.Linear(IN_DIM, DIM)
    ddp = nn.parallel.DistributedDataParallel(backbone)
    pfc = _sharded(ArcFace(), data)
    pfc(ddp(data["inputs"][mine]), data["labels"][mine]).backward()
    out["ddp"] = {"weight": backbone.weight.grad, "bias": backbone.bias.grad}

    torch.manual_seed(100 + rank)
    pfc = _sharded(CosFace(), data, num_classes=20, sample_rate=0.3, weight_key="weight20")
    labels = torch.tensor([1, 12, 12, 1, 1, 12, 12, 12])
    loss = pfc(data["emb"][mine], labels[mine])
    loss.backward()
    out["sampled"] = {"loss": loss.detach(), "weight_grad": pfc.weight.grad, "class_start": pfc.class_start,
                      "num_sample": pfc.num_sample}

    errors = []
    for emb, lab in ((data["emb"][mine][:BATCH - rank], data["labels"][mine][:BATCH - rank]),
                     (data["emb"][mine], data["labels"][mine] + (CLASSES - 6) * rank)):
        try:
            _sharded(ArcFace(), data)(emb, lab)
        except UserError as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


def _worker(rank, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        torch.save(_results(rank), f"{folder}/rank{rank}.pt")
    finally:
        cleanup()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pfc")
    mp.spawn(_worker, args=(str(folder),), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_sharding_layout(two_ranks):
    assert [(r["arcface"]["class_start"], r["arcface"]["num_local"]) for r in two_ranks] == [(0, 4), (4, 3)]


@pytest.mark.parametrize("mode", ["arcface", "softmax"])
def test_two_ranks_equal_one_process(two_ranks, mode):
    data = _data()
    margin = ArcFace() if mode == "arcface" else None
    loss, emb_grad, weight_grad, bias_grad = _reference(margin, data["emb"], data["labels"], data["weight"],
                                                        data["bias"])
    for rank, result in enumerate(two_ranks):
        part = result[mode]
        rows = slice(part["class_start"], part["class_start"] + part["num_local"])
        torch.testing.assert_close(part["loss"], loss)
        torch.testing.assert_close(part["weight_grad"], weight_grad[rows])
        if mode == "softmax":
            torch.testing.assert_close(part["bias_grad"], bias_grad[rows])
        # each rank's embeddings get world_size × the exact gradient: DDP's averaging undoes it
        torch.testing.assert_close(part["emb_grad"] / WORLD, emb_grad[rank * BATCH:(rank + 1) * BATCH])


def test_ddp_backbone_gradient_is_exact(two_ranks):
    data = _data()
    torch.manual_seed(0)
    backbone = nn.Linear(IN_DIM, DIM)
    logits = F.linear(F.normalize(backbone(data["inputs"])), F.normalize(data["weight"]))
    F.cross_entropy(ArcFace()(logits.clamp(-1, 1), data["labels"]), data["labels"]).backward()
    for result in two_ranks:
        torch.testing.assert_close(result["ddp"]["weight"], backbone.weight.grad)
        torch.testing.assert_close(result["ddp"]["bias"], backbone.bias.grad)


def test_sampling_only_touches_sampled_centres(two_ranks):
    data = _data()
    labels = torch.tensor([1, 12, 12, 1, 1, 12, 12, 12])
    chosen = []
    for result in two_ranks:
        part = result["sampled"]
        used = torch.nonzero(part["weight_grad"].abs().sum(1)).squeeze(1)
        assert part["num_sample"] == 3 and used.numel() == 3
        positive = {0: 1, 10: 2}[part["class_start"]]
        assert positive in used.tolist()
        chosen.append(used + part["class_start"])
    columns = torch.cat(chosen)
    remapped = torch.searchsorted(columns, labels)
    loss, _, weight_grad, _ = _reference(CosFace(), data["emb"], remapped, data["weight20"][columns])
    for rank, result in enumerate(two_ranks):
        torch.testing.assert_close(result["sampled"]["loss"], loss)
        used = chosen[rank] - result["sampled"]["class_start"]
        torch.testing.assert_close(result["sampled"]["weight_grad"][used], weight_grad[3 * rank:3 * rank + 3])


def test_errors_raised_on_every_rank(two_ranks):
    for result in two_ranks:
        size_error, label_error = result["errors"]
        assert "same batch size on every process, got [4, 3]" in size_error
        assert "label 7 is outside [0, 7)" in label_error


def test_hand_computed_cross_entropy():
    pfc = PartialFC(CosFace(s=2.0, margin=0.5), 2, 3)
    with torch.no_grad():
        pfc.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]))
    emb = torch.tensor([[4.0, 0.0], [0.0, -1.0]])
    loss = pfc(emb, torch.tensor([1, 2]))
    # cosines: row 0 [1, 0, -1] → logits [2, 2·(0 - 0.5), -2]; row 1 [0, -1, 0] → [0, -2, 2·(0 - 0.5)]
    row0 = math.log(math.exp(2) + math.exp(-1) + math.exp(-2)) - (-1)
    row1 = math.log(math.exp(0) + math.exp(-2) + math.exp(-1)) - (-1)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_loss_beyond_the_published_log_cap_is_exact():
    """A sample whose target probability is e^-100: the loss is the exact 100 (the published code logs
    −log 1e-30 = 69.08 for it; docs/methods.md, differences row 18) and the gradient is softmax − one-hot."""
    pfc = PartialFC(None, 2, 2)
    with torch.no_grad():
        pfc.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    emb = torch.tensor([[100.0, 0.0]], requires_grad=True)
    loss = pfc(emb, torch.tensor([0]))   # logits [0, 100], target 0
    assert loss.item() == pytest.approx(100.0, abs=1e-4) and loss.item() > -math.log(1e-30)
    loss.backward()
    # dL/dz = [p0 − 1, p1] = [−1, 1] (to e^-100); dz/dx = W, so dL/dx = W1 − W0
    torch.testing.assert_close(emb.grad, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(pfc.weight.grad, torch.tensor([[-100.0, 0.0], [100.0, 0.0]]))


def test_plain_softmax_equals_linear_cross_entropy():
    torch.manual_seed(0)
    pfc = PartialFC(None, 8, 10)
    linear = nn.Linear(8, 10)
    with torch.no_grad():
        linear.weight.copy_(pfc.weight)
        linear.bias.copy_(torch.randn(10))
        pfc.bias.copy_(linear.bias)
    x = torch.randn(6, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = torch.randint(0, 10, (6,))
    loss = pfc(x, y)
    ref = F.cross_entropy(linear(x_ref), y)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(pfc.weight.grad, linear.weight.grad)
    torch.testing.assert_close(pfc.bias.grad, linear.bias.grad)
    torch.testing.assert_close(pfc.logits(x.detach()), linear(x.detach()))


def test_init_logits_and_fp16():
    torch.manual_seed(0)
    pfc = PartialFC(ArcFace(), 64, 3000)
    assert pfc.weight.shape == (3000, 64) and pfc.bias is None
    assert pfc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert pfc.weight.mean().abs().item() < 1e-3
    x = torch.randn(5, 64)
    cos = pfc.logits(x)
    torch.testing.assert_close(cos, F.normalize(x) @ F.normalize(pfc.weight).t())
    labels = torch.randint(0, 3000, (5,))
    half = pfc(x.half(), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, pfc(x.half().float(), labels))


def test_large_logits_are_stable():
    pfc = PartialFC(None, 2, 3)
    with torch.no_grad():
        pfc.weight.copy_(torch.tensor([[1000.0, 0.0], [0.0, 1000.0], [0.0, 0.0]]))
    loss = pfc(torch.tensor([[1.0, 0.5]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(500.0 + math.log1p(math.exp(-500.0) + math.exp(-1000.0)), rel=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sampled_step_with_optimizers(optimizer):
    torch.manual_seed(0)
    pfc = PartialFC(ArcFace(), 8, 50, sample_rate=0.1)
    opt = torch.optim.SGD(pfc.parameters(), lr=0.5) if optimizer == "sgd" \
        else torch.optim.AdamW(pfc.parameters(), lr=0.1, weight_decay=0.0)
    before = pfc.weight.detach().clone()
    labels = torch.tensor([3, 3, 17, 41])
    loss = pfc(torch.randn(4, 8), labels)
    loss.backward()
    opt.step()
    changed = torch.nonzero((pfc.weight.detach() != before).any(1)).squeeze(1).tolist()
    assert len(changed) == pfc.num_sample == 5
    assert {3, 17, 41} <= set(changed)
    if optimizer == "adamw":
        assert opt.state[pfc.weight]["exp_avg"].shape == pfc.weight.shape


def test_positives_beyond_sample_budget():
    pfc = PartialFC(CosFace(), 4, 10, sample_rate=0.2)
    labels = torch.tensor([0, 3, 5, 9])
    pfc(torch.randn(4, 4), labels).backward()
    assert torch.nonzero(pfc.weight.grad.abs().sum(1)).squeeze(1).tolist() == [0, 3, 5, 9]


def test_bad_input():
    pfc = PartialFC(ArcFace(), 4, 10)
    with pytest.raises(UserError, match="label 10 is outside"):
        pfc(torch.randn(2, 4), torch.tensor([1, 10]))
    with pytest.raises(UserError, match="label -1 is outside"):
        pfc(torch.randn(2, 4), torch.tensor([-1, 2]))
    with pytest.raises(UserError, match=r"shape \(N, 4\)"):
        pfc(torch.randn(2, 5), torch.tensor([1, 2]))
    with pytest.raises(UserError, match="2 embeddings but 3 labels"):
        pfc(torch.randn(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(UserError, match="sample_rate"):
        PartialFC(ArcFace(), 4, 10, sample_rate=0.0)
    with pytest.raises(UserError, match="num_classes"):
        PartialFC(ArcFace(), 4, 0)
    with pytest.raises(UserError, match="embedding_size"):
        PartialFC(ArcFace(), 4.0, 10)
    assert PartialFC(None, np.int64(4), np.int64(10)).num_local == 10


def _sample_by_indexing(local_labels, num_local, num_sample):
    """The sampling as insightface writes it (unique positives, boolean indexing): the reference."""
    in_shard = local_labels != -1
    positive = torch.unique(local_labels[in_shard])
    if positive.numel() >= num_sample:
        index = positive
    else:
        score = torch.rand(num_local)
        score[positive] = 2.0
        index = torch.topk(score, k=num_sample)[1].sort()[0]
    remapped = torch.full_like(local_labels, -1)
    remapped[in_shard] = torch.searchsorted(index, local_labels[in_shard])
    return index, remapped


def test_sampling_with_masks_equals_indexing():
    """The mask form (one host sync) draws the same centres and remaps the same labels, including when the
    positives fill or exceed the budget and when no label is in the shard."""
    for trial in range(300):
        generator = torch.Generator().manual_seed(trial)
        num_local = int(torch.randint(2, 120, (1,), generator=generator))
        classifier = PartialFC(None, 4, num_local, sample_rate=float(torch.rand(1, generator=generator)) * 0.9 + 0.05)
        labels = torch.randint(-1, num_local, (int(torch.randint(1, 48, (1,), generator=generator)),), generator=generator)
        if trial % 50 == 0:
            labels = torch.full_like(labels, -1)
        torch.manual_seed(trial)
        expected = _sample_by_indexing(labels, num_local, classifier.num_sample)
        torch.manual_seed(trial)
        index, remapped = classifier._sample(labels)
        assert torch.equal(index, expected[0]) and torch.equal(remapped, expected[1]), trial
