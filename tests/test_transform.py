"""Gallery transforms: closed forms recover known maps, FCT recipes and the held-out fit, saving, the
streaming pass, the commands."""
import math
import os

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from tools.benchmark.bench_transform import linear_problem
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


def test_scaled_procrustes_fits_rotation_offset_and_scale():
    """Centred, scaled Procrustes against scipy's rotation of the centred rows and the hand formula for
    the scale; it recovers a rotation + scale + offset exactly, which the uncentred one cannot."""
    rng = np.random.default_rng(10)
    x, rotation, offset = unit_rows(rng, 400, 8), ortho_group.rvs(8, random_state=11), rng.normal(0, 0.3, 8)
    noisy = 0.7 * x @ rotation + offset + rng.normal(0, 0.05, x.shape)
    weight, bias = transforms.scaled_procrustes(blocks(x, noisy, 64))
    xc, yc = x - x.mean(0), noisy - noisy.mean(0)
    reference, singular_sum = orthogonal_procrustes(xc, yc)
    scale = singular_sum / np.sum(xc ** 2)
    np.testing.assert_allclose(weight, scale * reference, atol=1e-10)
    np.testing.assert_allclose(bias, noisy.mean(0) - scale * x.mean(0) @ reference, atol=1e-10)
    exact = 0.7 * x @ rotation + offset
    weight, bias = transforms.scaled_procrustes(blocks(x, exact, 50))
    np.testing.assert_allclose(weight, 0.7 * rotation, atol=1e-10)
    np.testing.assert_allclose(bias, offset, atol=1e-10)
    uncentred = x @ transforms.procrustes(blocks(x, exact, 50))
    assert np.mean((uncentred - exact) ** 2) > 100 * np.mean((x @ weight + bias - exact) ** 2) + 1e-3


@pytest.mark.parametrize("kind", ["linear", "procrustes", "procrustes_scaled"])
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
    model = transforms.FCTTransform(128, 256, inner_dim=2048, skip=False)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (128, 256), (256, 512), (128, 256), (256, 512), (1024, 2048), (2048, 2048), (2048, 256)]
    assert [m.bias is not None for m in linears] == [False] * 6 + [True]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 6
    lrs = [transforms.fct_learning_rate(e, 80, 5) for e in (0, 4, 5, 42, 79)]
    assert lrs[:3] == pytest.approx([1e-4, 5e-4, 5e-4])
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 75)) * 5e-4)
    assert lrs[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 74 / 75)) * 5e-4)


def test_fct_learns_a_nonlinear_map_better_than_chance():
    rng = np.random.default_rng(6)
    x = unit_rows(rng, 600, 8).astype(np.float32)
    new = np.tanh(3 * x @ rng.normal(size=(8, 8))).astype(np.float32)
    logs = []
    model = transforms.fit("fct", x, new, epochs=8, inner_dim=64, log=logs.append, batch_size=32, skip=False)
    assert len(logs) == 8 and not model.training                 # one line per pass without held-out rows
    target = new / np.linalg.norm(new, axis=1, keepdims=True)
    error = np.mean((transforms.transform_rows(model, x) - target) ** 2)
    assert error < 0.5 * np.mean(target ** 2)


def test_split_rows_keeps_identities_apart():
    labels = np.repeat(np.arange(10), 3)
    rows, heldout, unit = transforms.split_rows(30, labels, 0.2, seed=1)
    assert unit == "identities" and len(heldout) == 6 and len(rows) == 24
    assert not set(labels[rows]) & set(labels[heldout])
    assert np.array_equal(np.sort(np.r_[rows, heldout]), np.arange(30))
    rows, heldout, unit = transforms.split_rows(30, None, 0.2, seed=1)
    assert unit == "rows" and (len(rows), len(heldout)) == (24, 6)
    with pytest.raises(UserError, match="at least 2 identities"):
        transforms.split_rows(5, np.zeros(5, int))


def test_heldout_fit_by_hand():
    """Mean cosine and per-coordinate MSE of a known map, and the predict-zero level (1/d for unit rows)."""
    model = transforms.build("linear", 2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    old = np.array([[1, 0], [0, 1], [3, 4]], np.float32)
    new = np.array([[1, 0], [1, 1], [0, 5]], np.float32)
    # h: (2, 0), (0, 0), (1.2, 0); targets (1, 0), (0.7071, 0.7071), (0, 1)
    fit = transforms.heldout_fit(model, old, new, np.arange(3))
    assert fit["cosine"] == pytest.approx((1 + 0 + 0) / 3)
    assert fit["mse"] == pytest.approx((1 + (0.5 + 0.5) + (1.2 ** 2 + 1)) / 6)
    zero = transforms.heldout_fit(transforms.build("linear", 2, 2), old, new, np.arange(3))
    assert zero == pytest.approx({"cosine": 0.0, "mse": 0.5})


def test_fct_defaults_reach_the_linear_fit_on_the_linear_problem():
    """The default recipe's held-out cosine is within 0.02 of the linear map's on new = rotation of old
    + noise, identities held out (a small version of bench_transform.py --linear_problem)."""
    old, new, labels = linear_problem(identities=150, per_identity=6, dim=32, noise=0.22)
    _, figures = transforms.fit_measured("fct", old, new, labels, log=lambda _: None)
    assert figures["split"] == "identities" and figures["heldout_pairs"] == 30 * 6
    assert figures["linear_cosine"] > 0.9
    assert figures["cosine"] >= figures["linear_cosine"] - 0.02
    assert figures["zero_mse"] == pytest.approx(1 / 32, rel=1e-5)
    _, plain = transforms.fit_measured("fct", old, new, labels, log=lambda _: None, steps=300, skip=False)
    assert plain["cosine"] < figures["linear_cosine"] - 0.02     # 300 steps without the skip path fall short


def test_fct_early_stopping_keeps_the_best_weights():
    old, new, labels = linear_problem(identities=60, per_identity=4, dim=16)
    rows, heldout, _ = transforms.split_rows(len(old), labels)
    model, history = transforms.train_fct(old, new, rows, heldout, log=lambda _: None, steps=400, eval_every=20,
                                          patience=2, inner_dim=32)
    best = min(history["checks"], key=lambda check: check[2])
    assert history["best_step"] == best[0] and history["steps"] < 400
    assert transforms.heldout_fit(model, old, new, heldout)["mse"] == pytest.approx(best[2], rel=1e-5)
    assert history["checks"][-1][0] - history["best_step"] == 2 * 20     # stopped after two worse checks


@pytest.mark.parametrize("kind", transforms.KINDS)
def test_save_load_apply_file_streaming(kind, tmp_path):
    rng = np.random.default_rng(7)
    old, new = rng.normal(size=(300, 6)).astype(np.float32), rng.normal(size=(300, 5)).astype(np.float32)
    model, figures = transforms.fit_measured(kind, old, new, np.arange(300) % 10, steps=20, inner_dim=16,
                                             log=lambda _: None)
    path = transforms.save(model, str(tmp_path / "h.pt"), figures, note="x")
    saved = torch.load(path, weights_only=True)
    assert (saved["kind"], saved["in_dim"], saved["out_dim"]) == (kind, 6, 5)
    assert saved["heldout"] == figures and saved["heldout"]["pairs"] + saved["heldout"]["heldout_pairs"] == 300
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
    printed = capsys.readouterr().out
    assert "procrustes transform of 200 features" in printed
    assert "held-out identities (" in printed and "procrustes cosine 1.0000" in printed
    np.testing.assert_allclose(np.load(tmp_path / "mapped.npy"), x @ rotation, atol=1e-5)
    heldout = transforms.load(str(tmp_path / "h.pt"))[1]["heldout"]
    assert heldout["split"] == "identities" and heldout["cosine"] == pytest.approx(1, abs=1e-6)
    fit_transform.main(["--old", str(tmp_path / "old_feature.npy"), "--new", str(tmp_path / "new_feature.npy"),
                        "--kind", "fct", "-o", str(tmp_path / "fct.pt"), "--published", "--epochs", "2",
                        "--inner_dim", "8", "--batch_size", "16"])
    saved = transforms.load(str(tmp_path / "fct.pt"))[1]
    assert not saved["skip"] and saved["about"]["fct_freeze_batchnorm"] == "0.5" and saved["inner_dim"] == 8
    assert saved["heldout"]["steps"] == 2 * math.ceil(saved["heldout"]["pairs"] / 16)   # --patience 0: whole budget
    np.save(tmp_path / "new_label.npy", labels[::-1])
    with pytest.raises(UserError, match="differ: the features are of different images or orders"):
        fit_transform.main(["--old", str(tmp_path / "old_feature.npy"), "--new", str(tmp_path / "new_feature.npy"),
                            "--kind", "linear", "-o", str(tmp_path / "h2.pt")])


@pytest.mark.parametrize("options, message", [(["--heldout", "1"], "--heldout must be a share between 0 and 1"),
                                              (["--steps", "5", "--epochs", "2"], "give --steps or --epochs, not both"),
                                              (["--patience", "-1"], "--patience must be 0 or more")])
def test_fit_command_refuses_bad_options(tmp_path, options, message):
    np.save(tmp_path / "old_feature.npy", np.ones((10, 4), np.float32))
    with pytest.raises(UserError, match=message):
        fit_transform.main(["--old", str(tmp_path / "old_feature.npy"), "--new", str(tmp_path / "old_feature.npy"),
                            "--kind", "fct", "-o", str(tmp_path / "h.pt"), *options])
    assert not os.path.exists(tmp_path / "h.pt")


def test_demo_cost_lines_average_the_heldout_fit_over_seeds():
    from tools.demo.transforms import LABELS, cost_lines

    fits = {kind: [{"cosine": 0.5 + i / 10, "mse": 0.002 + i / 1000, "zero_mse": 0.0078} for i in range(2)]
            for kind in LABELS}
    fits["fct"][1]["cosine"] = 0.9
    text = cost_lines({"seconds_per_million": dict.fromkeys(LABELS, 1.0), "fit_seconds": dict.fromkeys(LABELS, 0),
                       "backfill_seconds_per_million": 100.0, "heldout": fits})
    assert "0.550 / 0.002500 (linear)" in text and "0.700 / 0.002500 (FCT)" in text
    assert "predicting zero: MSE 0.007800" in text and "reused (FCT)" in text
    assert LABELS["fct"] == "FCT (no side information)"
