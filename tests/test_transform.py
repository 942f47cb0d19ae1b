"""Gallery transforms: closed forms recover known maps, FCT recipe, saving, the streaming pass, the commands."""
import math
import os

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from tools.transform import apply_transform, fit_transform, transforms
from utils.errors import UserError


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blocks(x, y, size):
    return [(x[s:s + size], y[s:s + size]) for s in range(0, len(x), size)]


def test_least_squares_recovers_a_known_affine_map_over_blocks():
    rng = np.random.default_rng(0)
    x, a, b = rng.normal(size=(500, 6)), rng.normal(size=(6, 4)), rng.normal(size=4)
    weight, bias = transforms.least_squares(blocks(x, x @ a + b, 64))
    np.testing.assert_allclose(weight, a, atol=1e-10)
    np.testing.assert_allclose(bias, b, atol=1e-10)
    noisy = x @ a + b + rng.normal(0, 0.1, (500, 4))
    weight, bias = transforms.least_squares(blocks(x, noisy, 77))
    reference = np.linalg.lstsq(np.c_[x, np.ones(500)], noisy, rcond=None)[0]
    np.testing.assert_allclose(np.r_[weight, bias[None]], reference, atol=1e-10)


def test_procrustes_recovers_a_rotation_and_matches_scipy():
    rng = np.random.default_rng(1)
    x, rotation = unit_rows(rng, 300, 8), ortho_group.rvs(8, random_state=2)
    np.testing.assert_allclose(transforms.procrustes(blocks(x, x @ rotation, 50)), rotation, atol=1e-10)
    noisy = x @ rotation + rng.normal(0, 0.2, x.shape)
    np.testing.assert_allclose(transforms.procrustes(blocks(x, noisy, 64)), orthogonal_procrustes(x, noisy)[0],
                               atol=1e-10)
    wider = ortho_group.rvs(12, random_state=3)[:8]           # 8 → 12, orthonormal rows
    np.testing.assert_allclose(transforms.procrustes(blocks(x, x @ wider, 64)), wider, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "procrustes"])
def test_fit_on_raw_features_maps_old_to_new(kind):
    """The transforms normalise both sides: raw features of arbitrary norms related by a rotation."""
    rng = np.random.default_rng(4)
    x, rotation = unit_rows(rng, 400, 8), ortho_group.rvs(8, random_state=5)
    old = (x * rng.uniform(5, 30, (400, 1))).astype(np.float32)
    new = (x @ rotation * rng.uniform(1, 3, (400, 1))).astype(np.float32)
    model = transforms.fit(kind, old, new)
    np.testing.assert_allclose(model.weight.detach().numpy(), rotation, atol=1e-5)
    np.testing.assert_allclose(model.bias.detach().numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(transforms.transform_rows(model, old, block=64), x @ rotation, atol=1e-5)


def test_fct_architecture_and_schedule_as_published():
    model = transforms.FCTTransform(128, 256)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (128, 256), (256, 512), (128, 256), (256, 512), (1024, 2048), (2048, 2048), (2048, 256)]
    assert [m.bias is not None for m in linears] == [False] * 6 + [True]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 6
    lrs = [transforms.fct_learning_rate(e, 80) for e in (0, 4, 5, 42, 79)]
    assert lrs[:3] == pytest.approx([1e-4, 5e-4, 5e-4])
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 75)) * 5e-4)
    assert lrs[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 74 / 75)) * 5e-4)


def test_fct_learns_a_nonlinear_map_better_than_chance():
    rng = np.random.default_rng(6)
    x = unit_rows(rng, 600, 8).astype(np.float32)
    new = np.tanh(3 * x @ rng.normal(size=(8, 8))).astype(np.float32)
    logs = []
    model = transforms.fit("fct", x, new, epochs=8, inner_dim=64, log=logs.append, batch_size=32)
    assert len(logs) == 8 and not model.training
    target = new / np.linalg.norm(new, axis=1, keepdims=True)
    error = np.mean((transforms.transform_rows(model, x) - target) ** 2)
    assert error < 0.5 * np.mean(target ** 2)


@pytest.mark.parametrize("kind", transforms.KINDS)
def test_save_load_apply_file_streaming(kind, tmp_path):
    rng = np.random.default_rng(7)
    old, new = rng.normal(size=(300, 6)).astype(np.float32), rng.normal(size=(300, 5)).astype(np.float32)
    model = transforms.fit(kind, old, new, epochs=2, inner_dim=16, log=lambda _: None)
    path = transforms.save(model, str(tmp_path / "h.pt"), note="x")
    saved = torch.load(path, weights_only=True)
    assert (saved["kind"], saved["in_dim"], saved["out_dim"]) == (kind, 6, 5)
    loaded, _ = transforms.load(path)
    np.save(tmp_path / "gallery.npy", old)
    transforms.apply_file(loaded, str(tmp_path / "gallery.npy"), str(tmp_path / "out.npy"), block=64)
    expected = transforms.transform_rows(model, old)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)
    np.save(tmp_path / "wrong.npy", new)
    with pytest.raises(UserError, match="5-d features, but the transform maps 6-d"):
        transforms.apply_file(loaded, str(tmp_path / "wrong.npy"), str(tmp_path / "bad.npy"))
    assert not os.path.exists(tmp_path / "bad.npy")


def test_load_refuses_other_files(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="not a gallery transform"):
        transforms.load(str(tmp_path / "state.pt"))


def test_commands_fit_and_apply(tmp_path, capsys):
    rng = np.random.default_rng(8)
    x, rotation = unit_rows(rng, 200, 4), ortho_group.rvs(4, random_state=9)
    np.save(tmp_path / "old_feature.npy", x.astype(np.float32))
    np.save(tmp_path / "new_feature.npy", (x @ rotation).astype(np.float32))
    labels = np.arange(200) % 7
    np.save(tmp_path / "old_label.npy", labels)
    np.save(tmp_path / "new_label.npy", labels)
    fit_transform.main(["--old", str(tmp_path / "old_feature.npy"), "--new", str(tmp_path / "new_feature.npy"),
                        "--kind", "procrustes", "-o", str(tmp_path / "h.pt")])
    apply_transform.main([str(tmp_path / "h.pt"), str(tmp_path / "old_feature.npy"), str(tmp_path / "mapped.npy")])
    assert "procrustes transform of 200 features" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "mapped.npy"), x @ rotation, atol=1e-5)
    np.save(tmp_path / "new_label.npy", labels[::-1])
    with pytest.raises(UserError, match="differ: the features are of different images or orders"):
        fit_transform.main(["--old", str(tmp_path / "old_feature.npy"), "--new", str(tmp_path / "new_feature.npy"),
                            "--kind", "linear", "-o", str(tmp_path / "h2.pt")])
