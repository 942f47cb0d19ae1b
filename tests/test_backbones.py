import numpy as np
import pytest
import torch
from easydict import EasyDict

from backbones import MODEL_NAMES, build_backbone, get_model, load_backbone
from utils.errors import UserError
from utils.io import atomic_torch_save

SMALL = dict(num_features=16, width=8)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_model_names():
    assert MODEL_NAMES == ("r18", "r34", "r50", "r100", "r200", "mbf", "vit_t", "vit_s", "vit_b", "vit_l")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_output_shape(name):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = get_model(name).train()
        out = model(torch.empty(2, 3, 112, 112))
    assert out.shape == (2, 512)


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_default_forward_values(name):
    torch.manual_seed(0)
    model = get_model(name).train()  # batch statistics: an untrained deep iresnet overflows in eval mode
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()


SMALL_CASES = [(name, size) for size in (32, 56) for name in MODEL_NAMES] + \
    [(name, size) for size in (48, 64) for name in ("r18", "mbf", "vit_t")]


@pytest.mark.parametrize("name,size", SMALL_CASES)
def test_small_width_and_input(name, size):
    torch.manual_seed(0)
    model = get_model(name, dropout=0.2, input_size=size, **SMALL).train()
    out = model(torch.randn(3, 3, size, size))
    assert out.shape == (3, 16)
    out.square().sum().backward()
    model.eval()
    with torch.no_grad():
        first = model(torch.randn(2, 3, size, size))
    assert first.shape == (2, 16)


def _iresnet_formula(layers, w=64, d=512, side=7):
    """Parameter count of an iresnet, written out independently of the module code."""
    bn = lambda c: 2 * c  # noqa: E731
    total = 3 * 9 * w + bn(w) + w  # stem conv, BN, PReLU
    cin = w
    for stage, blocks in enumerate(layers):
        cout = w * 2 ** stage
        for i in range(blocks):
            c = cin if i == 0 else cout
            total += bn(c) + 9 * c * cout + bn(cout) + cout + 9 * cout * cout + bn(cout)
            if i == 0:
                total += c * cout + bn(cout)  # 1×1 projection shortcut
        cin = cout
    return total + bn(8 * w) + (8 * w * side * side + 1) * d + bn(d)


def test_r50_parameter_count_matches_insightface():
    model = get_model("r50")
    # insightface arcface_torch r50 (112 px, 512-d): 43.59 M parameters
    assert _count(model) == 43_590_848 == _iresnet_formula((3, 4, 14, 3))
    with torch.device("meta"):
        assert _count(get_model("r18")) == _iresnet_formula((2, 2, 2, 2))
        assert _count(get_model("r100")) == _iresnet_formula((3, 13, 30, 3))
        assert _count(get_model("r200")) == _iresnet_formula((6, 26, 60, 6))
    small = get_model("r34", num_features=24, width=8, input_size=56)
    assert _count(small) == _iresnet_formula((3, 4, 6, 3), w=8, d=24, side=4)
    assert small.fc.in_features == 8 * 8 * 4 * 4
    assert get_model("r18", width=8, input_size=32).fc.in_features == 64 * 2 * 2
    assert get_model("r18", width=8, input_size=64).fc.in_features == 64 * 4 * 4


def test_insightface_parameter_names():
    with torch.device("meta"):
        r50, mbf, vit = (get_model(n).state_dict() for n in ("r50", "mbf", "vit_t"))
    expected = {
        "conv1.weight": (64, 3, 3, 3), "bn1.weight": (64,), "prelu.weight": (64,),
        "layer1.0.bn1.weight": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.0.prelu.weight": (64,), "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (64,), "layer3.13.bn3.bias": (256,),
        "layer4.2.conv2.weight": (512, 512, 3, 3), "bn2.weight": (512,),
        "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,), "features.weight": (512,),
        "features.running_mean": (512,),
    }
    for key, shape in expected.items():
        assert tuple(r50[key].shape) == shape, key
    assert "layer3.14.bn1.weight" not in r50
    assert tuple(mbf["layers.0.layers.0.weight"].shape) == (128, 3, 3, 3)
    assert tuple(mbf["conv_sep.layers.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(mbf["features.layers.0.layers.0.weight"].shape) == (512, 1, 7, 7)
    assert tuple(mbf["features.layers.2.weight"].shape) == (512, 512)
    assert tuple(vit["patch_embed.proj.weight"].shape) == (256, 3, 9, 9)
    assert tuple(vit["pos_embed"].shape) == (1, 144, 256)
    assert tuple(vit["blocks.11.attn.qkv.weight"].shape) == (768, 256)
    assert "blocks.0.attn.qkv.bias" not in vit
    assert tuple(vit["feature.0.weight"].shape) == (256, 144 * 256)
    assert tuple(vit["feature.3.running_var"].shape) == (512,)
    assert tuple(vit["mask_token"].shape) == (1, 1, 256)


def test_vit_variants():
    for name, dim, depth in [("vit_s", 512, 12), ("vit_b", 512, 24), ("vit_l", 768, 24)]:
        model = get_model(name, width=8, input_size=32)
        assert len(model.blocks) == depth
        assert model.pos_embed.shape == (1, 9, dim // 8)


def test_features_bn_scale_is_fixed():
    torch.manual_seed(0)
    model = get_model("r18", **SMALL, input_size=32).train()
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, weight_decay=5e-4)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert model.features.weight.grad is None
    assert torch.equal(model.features.weight, torch.ones(16))
    assert model.features.bias.requires_grad


def test_bad_options():
    with pytest.raises(UserError, match="unknown network 'r51'.*r18, r34, r50, r100, r200, mbf, vit_t"):
        get_model("r51")
    with pytest.raises(UserError, match="input_size"):
        get_model("r18", input_size=8)
    with pytest.raises(UserError, match="width"):
        get_model("r18", width=0)
    with pytest.raises(UserError, match="dropout"):
        get_model("r18", dropout=1.5)
    with pytest.raises(UserError, match="heads"):
        get_model("vit_t", width=1)
    model = get_model("r18", **SMALL, input_size=32).eval()
    with pytest.raises(UserError, match=r"\(B, 3, 32, 32\)"):
        model(torch.randn(1, 3, 56, 56))


def test_build_backbone_from_config():
    cfg = EasyDict(network="mbf", embedding_size=np.int64(32), dropout=0.1, network_width=8, input_size=56)
    model = build_backbone(cfg).eval()
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 32)
    assert model.features.dropout.p == 0.1


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_load_backbone_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = get_model(name, num_features=24, width=8, input_size=32).train()
    model(torch.randn(4, 3, 32, 32))  # move BN running statistics away from their initial values
    model.eval()
    path = tmp_path / "model.pt"
    atomic_torch_save({"module." + k: v for k, v in model.state_dict().items()}, path)
    loaded = load_backbone(path, name, width=8, input_size=32)
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded(x).shape == (2, 24)


def test_load_backbone_mismatches(tmp_path):
    path = tmp_path / "model.pt"
    state = get_model("r18", **SMALL, input_size=32).state_dict()
    atomic_torch_save(state, path)
    with pytest.raises(UserError, match=r"different backbone than r50 \(missing keys layer1\.2\.bn1\.bias, .*more\)\); "
                                        r"the file holds an iresnet r18 of width 8 with 16-d embeddings$"):
        load_backbone(path, "r50", width=8, input_size=32)
    with pytest.raises(UserError, match=r"different backbone than mbf \(missing keys features\.layers\.3\.weight\); "
                                        r"the file holds an iresnet r18"):
        load_backbone(path, "mbf", width=8, input_size=32)
    with pytest.raises(UserError, match="does not match r18 with width=16, input_size=32"):
        load_backbone(path, "r18", width=16, input_size=32)
    with pytest.raises(UserError, match="does not match r18 with width=8, input_size=56"):
        load_backbone(path, "r18", width=8, input_size=56)
    with pytest.raises(UserError, match="unknown network"):
        load_backbone(path, "resnet18")

    atomic_torch_save({**state, "fc_softmax.weight": torch.zeros(5, 16)}, path)
    with pytest.raises(UserError, match="classifier-head keys \\(fc_softmax.weight\\).*backbone only"):
        load_backbone(path, "r18", width=8, input_size=32)
    atomic_torch_save({**state, "extra.weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=r"different backbone than r18 \(unexpected keys extra\.weight\)"):
        load_backbone(path, "r18", width=8, input_size=32)
    atomic_torch_save({"backbone": state, "epoch": 3}, path)
    with pytest.raises(UserError, match="not a backbone state_dict"):
        load_backbone(path, "r18", width=8, input_size=32)
    torch.save({"weights": EasyDict(a=1)}, path)
    with pytest.raises(UserError, match="pickled"):
        load_backbone(path, "r18", width=8, input_size=32)
    with pytest.raises(UserError, match="not found"):
        load_backbone(tmp_path / "missing.pt", "r18")


def test_load_backbone_without_bn_counters(tmp_path):
    model = get_model("r18", **SMALL, input_size=32).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "model.pt"
    atomic_torch_save(state, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_backbone(path, "r18", width=8, input_size=32)(x), model(x))
