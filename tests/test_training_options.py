"""Training options off by default: AMP dtype, TF32, channels_last and torch.compile (CPU-checkable parts)."""
import os

import pytest
import torch

from tests.helpers import make_tiny_rec, python, tiny_train_config
from utils.config import get_config
from utils.io import safe_torch_load
from utils.trainer import autocast_dtype, logits_autocast_dtype, set_precision


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return make_tiny_rec(str(tmp_path_factory.mktemp("data")), num_classes=6, per_class=8)


def _cfg(tmp_path, **keys):
    return get_config(tiny_train_config(tmp_path / "cfg.py", "unused", str(tmp_path / "out"), **keys))


@pytest.mark.parametrize("keys, device, expected", [
    (dict(fp16=True), "cuda", torch.float16),                          # published default
    (dict(fp16=True, amp_dtype="bfloat16"), "cuda", torch.bfloat16),
    (dict(fp16=False, amp_dtype="bfloat16"), "cuda", None),
    (dict(fp16=True, amp_dtype="bfloat16"), "cpu", None),              # AMP runs on CUDA only
])
def test_autocast_dtype(tmp_path, keys, device, expected):
    assert autocast_dtype(_cfg(tmp_path, **keys), torch.device(device)) == expected


def test_loss_scaling_only_with_float16(tmp_path):
    """GradScaler is enabled exactly when autocast runs in float16 (bfloat16 has fp32's range)."""
    for dtype, scaled in (("float16", True), ("bfloat16", False)):
        cfg = _cfg(tmp_path, fp16=True, amp_dtype=dtype)
        assert (autocast_dtype(cfg, torch.device("cuda")) == torch.float16) is scaled


@pytest.mark.parametrize("value, matmul, conv", [(False, False, False), (True, True, True), ("conv", False, True)])
def test_tf32_sets_matrix_products_and_convolutions(tmp_path, value, matmul, conv):
    """tf32 = False is full fp32 for convolutions too (cuDNN's own default would use TF32 for them)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = not matmul, not conv
        set_precision(_cfg(tmp_path, tf32=value))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, conv)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("keys, expected", [
    (dict(fp16=True), torch.float16),                                   # published: fp16 logits
    (dict(fp16=True, amp_logits=False), None),
    (dict(fp16=True, amp_dtype="bfloat16"), None),                      # bf16 logits would be ~10x coarser
])
def test_logits_dtype(tmp_path, keys, expected):
    assert logits_autocast_dtype(_cfg(tmp_path, **keys), torch.device("cuda")) == expected


def _weights(tmp_path, rec, name, **keys):
    cfg = tiny_train_config(tmp_path / f"{name}.py", rec, str(tmp_path / name), max_steps=4, num_epoch=1, **keys)
    proc = python("train_old_arc.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return safe_torch_load(os.path.join(tmp_path, name, "model.pt"))


@pytest.mark.parametrize("keys", [dict(channels_last=True), dict(compile="aot_eager")], ids=["channels_last", "compile"])
def test_layout_and_compile_train_like_eager(tmp_path, tiny_rec, keys):
    """A few training steps with the option on end close to the default run's weights. torch.compile runs
    with the aot_eager backend (graph capture and AOT autograd without generating C++, which takes
    minutes on a small CPU); the default inductor backend is exercised by gpu_check.py on a GPU."""
    eager = _weights(tmp_path, tiny_rec, "eager")
    other = _weights(tmp_path, tiny_rec, "other", **keys)
    assert eager.keys() == other.keys()
    for name in eager:
        assert torch.allclose(eager[name].float(), other[name].float(), rtol=1e-3, atol=1e-4), name
