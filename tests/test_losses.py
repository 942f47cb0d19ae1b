import math

import pytest
import torch

from losses import ArcFace, CombinedMarginLoss, CosFace
from utils.errors import UserError


def _cos(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_arcface_hand_computed():
    # row 0: θ = π/3 → cos(π/3 + 0.5); row 1: θ + m > π → fallback; row 2: label -1 (other shard)
    logits = _cos([0.5, 0.2, -0.1], [0.3, -0.95, 0.0], [0.7, 0.1, 0.4])
    labels = torch.tensor([0, 1, -1])
    out = ArcFace(s=64.0, margin=0.5)(logits, labels)
    target0 = 0.5 * math.cos(0.5) - math.sqrt(1 - 0.25) * math.sin(0.5)
    assert target0 == pytest.approx(math.cos(math.pi / 3 + 0.5))
    assert math.acos(-0.95) + 0.5 > math.pi
    target1 = -0.95 - 0.5 * math.sin(math.pi - 0.5)
    expected = 64.0 * _cos([target0, 0.2, -0.1], [0.3, target1, 0.0], [0.7, 0.1, 0.4])
    torch.testing.assert_close(out, expected)


def test_arcface_threshold_is_cos_pi_minus_m():
    m = 0.5
    inside = math.cos(math.pi - m) + 1e-6
    outside = math.cos(math.pi - m) - 1e-6
    out = ArcFace(s=1.0, margin=m)(_cos([inside], [outside]), torch.tensor([0, 0]))
    assert out[0, 0].item() == pytest.approx(math.cos(math.acos(inside) + m), abs=1e-9)
    assert out[1, 0].item() == pytest.approx(outside - m * math.sin(math.pi - m), abs=1e-12)
    # the fallback stays a penalty: below cos θ, and below cos(θ + m) = -1 at the switch
    assert out[1, 0].item() < min(outside, out[0, 0].item())


def test_arcface_gradient():
    c = torch.tensor([[0.5, 0.1], [-0.95, 0.3]], dtype=torch.float64, requires_grad=True)
    out = ArcFace(s=2.0, margin=0.5)(c, torch.tensor([0, 0]))
    out.sum().backward()
    # d/dc cos(arccos c + m) = cos m + c·sin m / sqrt(1 - c²); the fallback has slope 1
    slope = math.cos(0.5) + 0.5 * math.sin(0.5) / math.sqrt(1 - 0.25)
    expected = 2.0 * torch.tensor([[slope, 1.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(c.grad, expected)


def test_arcface_gradient_finite_at_cos_one():
    c = torch.tensor([[1.0, -1.0]], requires_grad=True)
    ArcFace()(c, torch.tensor([0])).sum().backward()
    assert torch.isfinite(c.grad).all()


def test_cosface_hand_computed():
    logits = _cos([0.5, 0.2], [0.3, -0.95], [0.7, 0.1])
    out = CosFace(s=30.0, margin=0.35)(logits, torch.tensor([1, 0, -1]))
    expected = 30.0 * _cos([0.5, 0.2 - 0.35], [0.3 - 0.35, -0.95], [0.7, 0.1])
    torch.testing.assert_close(out, expected)


def test_combined_margin_hand_computed():
    logits = _cos([0.5, 0.2], [0.6, -0.4])
    labels = torch.tensor([0, 1])
    out = CombinedMarginLoss(64.0, 1.0, 0.3, 0.2)(logits, labels)
    expected = 64.0 * _cos([math.cos(math.acos(0.5) + 0.3) - 0.2, 0.2],
                           [0.6, math.cos(math.acos(-0.4) + 0.3) - 0.2])
    torch.testing.assert_close(out, expected)
    sphere = CombinedMarginLoss(1.0, 2.0, 0.0, 0.0)(_cos([0.5, 0.1]), torch.tensor([0]))
    assert sphere[0, 0].item() == pytest.approx(-0.5)  # cos(2·π/3)
    assert sphere[0, 1].item() == pytest.approx(0.1)


def test_insightface_margin_lists():
    logits = _cos([0.5, 0.2])
    labels = torch.tensor([0])
    torch.testing.assert_close(CombinedMarginLoss(64, 1.0, 0.5, 0.0)(logits, labels), ArcFace(64, 0.5)(logits, labels))
    torch.testing.assert_close(CombinedMarginLoss(64, 1.0, 0.0, 0.4)(logits, labels), CosFace(64, 0.4)(logits, labels))


def test_interclass_filtering():
    logits = _cos([0.9, 0.5, 0.3], [0.6, 0.2, 0.45])
    labels = torch.tensor([0, -1])
    out = CombinedMarginLoss(1.0, 1.0, 0.0, 0.4, interclass_filtering_threshold=0.4)(logits, labels)
    expected = _cos([0.9 - 0.4, 0.0, 0.3], [0.0, 0.2, 0.0])
    torch.testing.assert_close(out, expected)


def test_input_not_modified_and_rows_without_label():
    logits = _cos([0.5, 0.2], [0.1, 0.3])
    before = logits.clone()
    out = ArcFace(s=10.0)(logits, torch.tensor([-1, -1]))
    torch.testing.assert_close(out, 10.0 * before)
    torch.testing.assert_close(logits, before)


def test_bad_margin_options():
    with pytest.raises(UserError, match="s > 0"):
        CombinedMarginLoss(0.0, 1.0, 0.5, 0.0)
    with pytest.raises(UserError, match="m1 > 0"):
        CombinedMarginLoss(64.0, 0.0, 0.5, 0.0)
