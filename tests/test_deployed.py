"""Deployed old models (ONNX, TorchScript) with stated preprocessing: parsing, input, checks, step 2, IJB transform."""
import os

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from backbones import get_model
from helpers import make_tiny_rec
from tools.get_feature import get_feature
from utils.dataset import MXFaceDataset, to_model_input
from utils.deployed import Preprocessing, load_model, model_kind, parse_preprocessing
from utils.errors import UserError

SD = "f16_deployed_arc_class70"


def test_parse_preprocessing_keys_defaults_and_errors():
    assert parse_preprocessing(None) == Preprocessing()
    spec = parse_preprocessing("mean=123.675/116.28/103.53,std=58.395/57.12/57.375,bgr,flip_sum")
    assert spec == Preprocessing((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), True, True)
    assert parse_preprocessing("scale=0.0078125").std == (128.0,)
    assert parse_preprocessing("rgb", Preprocessing(bgr=True, flip_sum=True)) == Preprocessing(flip_sum=True)
    with pytest.raises(UserError, match=r"unknown item 'gray'"):
        parse_preprocessing("mean=1,gray")
    with pytest.raises(UserError, match="expected one number or three"):
        parse_preprocessing("mean=1/2")
    with pytest.raises(UserError, match="with and without the mirror image"):
        parse_preprocessing("flip_sum", allow_flip=False)


def test_model_input_per_channel_and_bgr_by_hand():
    images = torch.tensor([[[[10]], [[20]], [[30]]]], dtype=torch.uint8)      # one 1×1 RGB pixel
    spec = Preprocessing(mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0), bgr=True)
    x = to_model_input(images, spec.scale, spec.centre, spec.bgr)
    assert x.flatten().tolist() == pytest.approx([(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 8])
    x = to_model_input(images, 1 / 127.5, 127.5)
    assert x.flatten().tolist() == pytest.approx([(v - 127.5) / 127.5 for v in (10, 20, 30)])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A toolkit backbone as TorchScript and ONNX, its state_dict, and a class70 split to embed."""
    from tools import export_onnx

    root = tmp_path_factory.mktemp("deployed")
    torch.manual_seed(0)
    model = get_model("r18", num_features=16, width=8, input_size=32).eval()
    torch.save(model.state_dict(), root / "model.pt")
    torch.jit.trace(model, torch.zeros(2, 3, 32, 32)).save(str(root / "model.torchscript.pt"))
    export_onnx.export(str(root / "model.pt"), "r18", str(root / "model.onnx"), width=8, input_size=32)
    rec = make_tiny_rec(str(root / "data"), num_classes=4, per_class=5, name="train_part_70_class")
    return root, model, rec


def test_kind_detection_and_input_checks(deployed):
    root, _, _ = deployed
    assert [model_kind(str(root / f)) for f in ("model.pt", "model.torchscript.pt", "model.onnx")] == \
        ["state_dict", "torchscript", "onnx"]
    with pytest.raises(UserError, match=r"expects input of shape \['batch', 3, 32, 32\], not \(B, 3, 112, 112\); "
                                        "pass the matching --input_size"):
        load_model(str(root / "model.onnx"), 112, torch.device("cpu"))
    scripted = load_model(str(root / "model.torchscript.pt"), 32, torch.device("cpu"))
    assert scripted(torch.zeros(1, 3, 32, 32)).shape == (1, 16)
    with pytest.raises(UserError, match="fails on \\(B, 3, 48, 48\\) input .*pass the matching --input_size"):
        load_model(str(root / "model.torchscript.pt"), 48, torch.device("cpu"))
    with pytest.raises(UserError, match="not an ONNX file or a TorchScript export"):
        load_model(str(root / "model.pt"), 32, torch.device("cpu"))


@pytest.mark.parametrize("file", ["model.torchscript.pt", "model.onnx"])
def test_get_feature_with_a_deployed_model_and_flip_sum(deployed, file, tmp_path):
    """Step 2 without a config: bgr input, per-channel mean/std, flip-sum, against the model run by hand."""
    root, model, rec = deployed
    spec = "mean=120/125/130,std=60/62/64,bgr,flip_sum"
    get_feature.main(["--model", str(root / file), "--input_size", "32", "--preprocess", spec, "--dataset", rec,
                      "--SD", SD, "--output", str(tmp_path), "--num_workers", "0",
                      "--cache_dir", str(tmp_path / "cache")])
    images = MXFaceDataset(rec, train=False, input_size=32, uint8=True).get_batch(np.arange(20))[0]
    x = (images.flip(1).float() - torch.tensor([120.0, 125, 130]).view(3, 1, 1)) / torch.tensor([60.0, 62, 64]).view(
        3, 1, 1)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / f"{SD}_feature.npy"), expected, atol=1e-4)
    assert np.load(tmp_path / f"{SD}_label.npy").tolist() == np.repeat(np.arange(4), 5).tolist()


def test_get_feature_needs_a_config_or_a_model_and_data(deployed, tmp_path):
    root, _, rec = deployed
    with pytest.raises(UserError, match="give the old model's config, or a deployed model with --model FILE"):
        get_feature.main(["--model", str(root / "model.onnx"), "--SD", SD, "--output", str(tmp_path)])
    with pytest.raises(UserError, match="makes 16-d embeddings but --SD f32_x_class70 says f32"):
        get_feature.main(["--model", str(root / "model.onnx"), "--input_size", "32", "--dataset", rec,
                          "--SD", "f32_x_class70", "--output", str(tmp_path), "--num_workers", "0"])
    assert not os.path.exists(tmp_path / "f32_x_class70_feature.npy")


def test_ijb_transform_test_of_a_rotated_old_space_equals_the_self_test(tmp_path):
    """Old embeddings = new ones rotated: the Procrustes transform maps the old gallery back exactly."""
    from tools.ijbc_eval.ijbc_eval import evaluate
    from tools.ijbc_eval.meta import load_meta
    from tools.synthetic import make_synthetic
    from tools.transform import transforms

    data = tmp_path / "data"
    make_synthetic.main(["--out", str(data), "--identities", "2", "--images-per-identity", "1",
                         "--ijb-identities", "8", "--workers", "0"])
    count = len(load_meta(str(data), "IJBC", False))
    rng = np.random.default_rng(0)
    unit = [(lambda e: e / np.linalg.norm(e, axis=1, keepdims=True))(rng.normal(size=(count, 8))) for _ in range(2)]
    embs, embs_f = (u.astype(np.float32) for u in unit)
    rotation = ortho_group.rvs(8, random_state=1)
    np.savez(tmp_path / "embs.npz", embs=embs, embs_f=embs_f, embs_old=embs @ rotation.T, embs_f_old=embs_f @ rotation.T)
    model = transforms.fit("procrustes", embs @ rotation.T, embs)
    transforms.save(model, str(tmp_path / "h.pt"))
    options = dict(data_path=str(data), plot=False, verbose=False)
    for one_to_n in (False, True):
        np.savez(tmp_path / "self.npz", embs=embs, embs_f=embs_f)
        own = evaluate(restore_embs=str(tmp_path / "self.npz"), one_to_n=one_to_n, **options)
        mapped = evaluate(restore_embs=str(tmp_path / "embs.npz"), one_to_n=one_to_n, transform=str(tmp_path / "h.pt"),
                          **options)
        assert mapped["test"] == "transform" and own["test"] == "self"
        key = "TAR@FAR" if not one_to_n else "top1"
        assert mapped[key] == pytest.approx(own[key], abs=1e-6)
    with pytest.raises(UserError, match="--transform maps the old model's gallery"):
        evaluate(restore_embs=None, model_file="x.pt", transform=str(tmp_path / "h.pt"), **options)
