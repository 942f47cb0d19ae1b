"""Every BCT method trains end to end on a tiny RecordIO set (CPU): one process, two gloo ranks,
from the method folder, exact resume of method state, and one-line errors for bad old-feature files."""
import importlib
import os

import numpy as np
import pytest
import torch

from backbones import build_backbone
from losses import arcface_classifier
from tests.helpers import ROOT, make_tiny_rec, python, tiny_train_config, write_config
from utils.config import get_config
from utils.distributed import cleanup
from utils.errors import UserError
from utils.feature_stats import class_prototypes, credible_mask
from utils.io import safe_torch_load
from utils.trainer import train

METHODS = ("MixBCT", "BCT", "UniBCT", "NCCL", "L2", "AdvBCT")
PARTS = {"MixBCT": "mixed_rows", "BCT": "influence", "UniBCT": "influence", "NCCL": "l2", "L2": "l2", "AdvBCT": "p2s"}


def write_features(folder, labels, dim, prefix):
    """Old features clustered by class, their prototypes and a 90 % credible mask (steps 2–4 stand-ins)."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(labels.max() + 1, dim))
    features = (centres[labels] + 0.5 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    paths = {kind: os.path.join(folder, f"{prefix}_{kind}.npy")
             for kind in ("feature", "label", "avg_feature", "credible_ratio_90_feature")}
    os.makedirs(folder, exist_ok=True)
    np.save(paths["feature"], features)
    np.save(paths["label"], labels)
    np.save(paths["avg_feature"], class_prototypes(features, labels))
    np.save(paths["credible_ratio_90_feature"], credible_mask(features, labels, 0.9))
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("methods")
    rec = make_tiny_rec(str(folder / "data"), num_classes=6, per_class=8)
    labels = np.repeat(np.arange(6), 8)
    return folder, rec, write_features(str(folder / "features"), labels, 16, "f16_r18_softmax_class100")


def method_keys(method, paths):
    feature, prototype, mask = paths["feature"], paths["avg_feature"], paths["credible_ratio_90_feature"]
    return {"MixBCT": dict(old_embedding=feature, credible_old_feature=mask, mix_ratio=0.5),
            "BCT": dict(old_prototype=prototype),
            "UniBCT": dict(old_prototype=prototype, old_embedding=feature, refine_epochs=(1,),
                           lr_schedule="step", lr_steps=(1,)),
            "NCCL": dict(old_embedding=feature, queue_size=64),
            "L2": dict(old_embedding=feature, threshold=0.2),
            "AdvBCT": dict(old_embedding=feature)}[method]


def method_config(tmp_path, method, rec, paths, name="cfg", **overrides):
    """A tiny config in a folder whose base.py is the method's own (so its keys are declared)."""
    folder = tmp_path / method
    folder.mkdir(exist_ok=True)
    (folder / "base.py").write_text(f"from BCT_methods.{method}.configs.base import config  # noqa: F401\n")
    keys = dict(method_keys(method, paths), **overrides)
    output = str(tmp_path / f"out_{name}")
    return tiny_train_config(folder / f"{name}.py", rec, output, **keys), output


def assert_trained(output, part):
    state = safe_torch_load(os.path.join(output, "model.pt"))
    assert state["fc.weight"].shape[0] == 16 and not any(k.startswith("module.") for k in state)
    log = open(os.path.join(output, "training.log")).read()
    assert f" {part} " in log, log[-1500:]
    return state, log


def train_in_process(method, cfg_path, resume=False):
    """``BCT_methods/<method>/train.py cfg`` without a new interpreter (saves the import time per run);
    one intra-op thread, as the subprocess runs (OMP_NUM_THREADS=1)."""
    method_class = getattr(importlib.import_module(f"BCT_methods.{method}.losses"), method)
    cfg = get_config(cfg_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg, method_class(cfg), build_backbone, arcface_classifier, None, resume)
    finally:
        cleanup()
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", METHODS)
def test_single_process(tmp_path, tiny, method):
    _, rec, paths = tiny
    cfg, out = method_config(tmp_path, method, rec, paths)
    train_in_process(method, cfg)
    _, log = assert_trained(out, PARTS[method])
    assert ("prototypes refined" in log) == (method == "UniBCT")


@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_ranks_from_root(tmp_path, tiny, method):
    _, rec, paths = tiny
    cfg, out = method_config(tmp_path, method, rec, paths, max_steps=4)
    port = str(29600 + (os.getpid() + 37 * METHODS.index(method)) % 800)
    proc = python("-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", f"--master_port={port}",
                  os.path.join("BCT_methods", method, "train.py"), cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, log = assert_trained(out, PARTS[method])
    assert "2 process(es)" in log and ("prototypes refined" in log) == (method == "UniBCT")


def test_demo_config_from_the_method_folder(tmp_path):
    """``cd BCT_methods/MixBCT && python train.py configs/demo_MixBCT.py`` (shipped config, relative path)."""
    data, out = tmp_path / "data", tmp_path / "demo"
    make_tiny_rec(str(data), num_classes=8, per_class=10)
    write_features(str(out / "feature_save" / "EXclass"), np.repeat(np.arange(8), 10), 128, "f128_r18_softmax_class100")
    from configs.demo.settings import Demo
    from tools.demo.commands import train_command

    overrides = train_command(Demo("quick", str(data), str(out), "EXclass"), "MixBCT")[3:]
    proc = python("train.py", "configs/demo_MixBCT.py", "--set", *overrides,
                  cwd=os.path.join(ROOT, "BCT_methods", "MixBCT"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = safe_torch_load(os.path.join(out, "MixBCT", "model.pt"))
    assert state["fc.weight"].shape[0] == 128


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["UniBCT", "NCCL"])
def test_resume_restores_method_state(tmp_path, tiny, method):
    """Cut after the refine epoch (UniBCT prototypes) / with a filled queue (NCCL); resume = uninterrupted."""
    _, rec, paths = tiny
    keys = dict(save_every_steps=1, keep_checkpoints=2)
    cfg_ref, out_ref = method_config(tmp_path, method, rec, paths, "ref", **keys)
    train_in_process(method, cfg_ref)
    cfg, out = method_config(tmp_path, method, rec, paths, "cut", max_steps=8, **keys)
    train_in_process(method, cfg)
    cfg, out = method_config(tmp_path, method, rec, paths, "cut", **keys)
    first_log = open(os.path.join(out, "training.log")).read()
    train_in_process(method, cfg, resume=True)
    resumed_log = open(os.path.join(out, "training.log")).read()[len(first_log):]
    assert "resumed from step 8" in resumed_log and "prototypes refined" not in resumed_log
    reference, resumed = (safe_torch_load(os.path.join(o, "model.pt")) for o in (out_ref, out))
    assert _max_diff(reference, resumed) <= 1e-6


def test_bad_old_feature_files_stop_before_training(tmp_path, tiny):
    _, rec, paths = tiny
    np.save(tmp_path / "short.npy", np.zeros((47, 16), np.float32))
    np.save(tmp_path / "wide.npy", np.zeros((48, 8), np.float32))
    np.save(tmp_path / "none.npy", np.zeros(48, np.uint8))
    np.save(tmp_path / "protos.npy", np.zeros((5, 16), np.float32))
    cases = [("L2", dict(old_embedding=str(tmp_path / "short.npy")), "47 rows but the training set has 48"),
             ("AdvBCT", dict(old_embedding=str(tmp_path / "wide.npy")), "dimension 8 but embedding_size is 16"),
             ("MixBCT", dict(credible_old_feature=str(tmp_path / "none.npy")), "no sample as credible"),
             ("UniBCT", dict(old_prototype=str(tmp_path / "protos.npy")), "5 prototypes but the training set has 6")]
    for i, (method, keys, fragment) in enumerate(cases):
        cfg, out = method_config(tmp_path, method, rec, paths, f"bad{i}", **keys)
        with pytest.raises(UserError, match=fragment):
            train_in_process(method, cfg)
        assert not os.path.exists(os.path.join(out, "model.pt"))


def _one_line_error(proc, fragment):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr[-2000:]
    assert sum(line.startswith("error") for line in lines) == 1


def test_missing_file_and_missing_keys_give_one_line(tmp_path, tiny):
    _, rec, paths = tiny
    cfg, out = method_config(tmp_path, "MixBCT", rec, paths, old_embedding=str(tmp_path / "missing.npy"))
    _one_line_error(python(os.path.join("BCT_methods", "MixBCT", "train.py"), cfg), "missing.npy")
    assert not os.path.exists(os.path.join(out, "model.pt"))
    no_keys = write_config(tmp_path / "nokeys.py", rec=rec, output=str(tmp_path / "nokeys"), network="r18",
                           network_width=8, input_size=32, embedding_size=16, batch_size=8, num_workers=0)
    _one_line_error(python(os.path.join("BCT_methods", "L2", "train.py"), no_keys), "L2 needs old_embedding")


def _nccl_steps(rank, world, folder, labels, batch):
    """Three NCCL steps of a global batch of ``2·batch`` split over ``world`` gloo ranks; saves the gradients."""
    import types

    import torch.distributed as dist
    from easydict import EasyDict as edict

    from BCT_methods.NCCL.losses import NCCL
    from losses import ArcFace, PartialFC

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "store"), rank=rank,
                                world_size=world)
    torch.manual_seed(1)
    centres = torch.randn(5, 6)
    classifier = PartialFC(ArcFace(), 6, 5)
    with torch.no_grad():
        classifier.weight.copy_(centres[classifier.class_start:classifier.class_start + classifier.num_local])
    local = 2 * batch // world
    cfg = edict(config_path="nccl.py", embedding_size=6, batch_size=local, queue_size=16, alpha=1.0, beta=0.5,
                temperature=0.7, credible_old_feature=None, old_embedding=os.path.join(folder, "old.npy"),
                l1_gradient_scale=1.0, l2_gradient=True, mask_empty_slots=False)
    ctx = types.SimpleNamespace(cfg=cfg, classifier=classifier, device=torch.device("cpu"), dataset=labels,
                                dist=types.SimpleNamespace(world_size=world, rank=rank),
                                logger=types.SimpleNamespace(info=lambda *a: None))
    method = NCCL(cfg)
    method.setup(ctx)
    generator = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(3):
        indices = torch.randperm(len(labels), generator=generator)[:2 * batch][rank * local:(rank + 1) * local]
        embeddings = torch.randn(2 * batch, 6, generator=generator)[rank * local:(rank + 1) * local].requires_grad_()
        classifier.zero_grad()
        loss, _ = method.compute_loss(embeddings, torch.from_numpy(labels[indices.numpy()]), indices, ctx)
        loss.backward()
        grads.append((embeddings.grad, classifier.weight.grad.clone()))
    torch.save(grads, os.path.join(folder, f"grads_{world}_{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def test_nccl_two_ranks_give_the_one_process_gradients(tmp_path):
    """Sharded logits, all-reduced logit products, gathered queue: with DDP's averaging the backbone and the
    classifier get exactly the gradients of one process holding the whole batch."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 16)
    np.save(tmp_path / "old.npy", rng.normal(size=(16, 6)).astype(np.float32))
    _nccl_steps(0, 1, str(tmp_path), labels, 4)
    torch.multiprocessing.spawn(_nccl_steps, args=(2, str(tmp_path), labels, 4), nprocs=2)
    single = torch.load(tmp_path / "grads_1_0.pt")
    ranks = [torch.load(tmp_path / f"grads_2_{r}.pt") for r in range(2)]
    for step, (embedding_grad, weight_grad) in enumerate(single):
        averaged = torch.cat([ranks[0][step][0], ranks[1][step][0]]) / 2  # DDP averages over the 2 ranks
        assert torch.allclose(averaged, embedding_grad, atol=1e-5)
        assert torch.allclose(torch.cat([ranks[0][step][1], ranks[1][step][1]]), weight_grad, atol=1e-5)


def test_log_line_shows_a_row_count_after_the_loss():
    """A ``…_rows`` part (MixBCT's ``mixed_rows``) is a count per step, outside the loss parts."""
    from utils.logging_utils import SpeedLogger

    lines = []
    logger = SpeedLogger(2, 10, 8, type("Logger", (), {"info": staticmethod(lines.append)}))
    for step in (1, 2, 3, 4):
        logger(step, 0, {"loss": torch.tensor(2.0), "cls": torch.tensor(2.0), "mixed_rows": torch.tensor(step + 0.0)}, 0.1)
    assert "Loss 2.0000 (cls 2.0000)   mixed_rows 3.5/step   LearningRate" in lines[-1], lines
