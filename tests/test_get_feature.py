"""Steps 2–4 as users run them: get_feature.py, get_avg_feature.py, denoise_credible.py."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import ROOT, TINY_MODEL, chunk_files, free_port, make_tiny_rec, python, run, write_config
from utils.errors import UserError

SD = "f16_r18_softmax_class70"
GET = "tools/get_feature/get_feature.py"
AVG = "tools/get_feature/get_avg_feature.py"
DENOISE = "tools/get_feature/denoise_credible.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A class70 split of 5 classes × 7 images (35: shares do not divide evenly), an old r18 model."""
    from backbones import get_model

    root = tmp_path_factory.mktemp("getfeat")
    make_tiny_rec(str(root / "data"), num_classes=5, per_class=7, name="train_part_70_class")
    torch.manual_seed(0)
    model = get_model("r18", num_features=16, width=8, input_size=32)
    os.makedirs(root / "old")
    torch.save(model.state_dict(), root / "old" / "model.pt")
    cfg = write_config(root / "old_cfg.py", **TINY_MODEL, rec=str(root / "data" / "train_part_30_class"),
                       output=str(root / "old"), num_workers=0, fp16=False)
    return root, cfg


def _reference(root):
    """Embeddings computed directly: the model on every image (no flip), in dataset order."""
    from backbones import load_backbone
    from utils.dataset import MXFaceDataset

    dataset = MXFaceDataset(str(root / "data" / "train_part_70_class"), train=False, input_size=32)
    model = load_backbone(str(root / "old" / "model.pt"), "r18", 8, 32)
    images, labels, _ = dataset.get_batch(np.arange(len(dataset)))
    with torch.no_grad():
        return model(images).numpy(), labels.numpy()


def _main_of(script):
    """The ``main`` of a tool script, to call in-process."""
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _files(folder):
    return {kind: os.path.join(folder, f"{SD}_{kind}.npy") for kind in
            ("feature", "label", "avg_feature", "credible_ratio_90_feature")}


def test_extract_average_denoise_cli(setup):
    root, cfg = setup
    out = str(root / "single")
    proc = python(GET, cfg, "--SD", SD, "--output", out, "--batch_size", "8")
    assert proc.returncode == 0, proc.stderr
    files = _files(out)
    features, labels = np.load(files["feature"]), np.load(files["label"])
    expected, expected_labels = _reference(root)
    assert features.dtype == np.float32 and features.shape == (35, 16)
    assert labels.dtype == np.int64 and np.array_equal(labels, expected_labels)
    np.testing.assert_allclose(features, expected, atol=1e-5)

    _main_of(AVG)(["--SD", SD, "--output", out])
    means = np.stack([expected[labels == c].mean(axis=0) for c in range(5)])
    np.testing.assert_allclose(np.load(files["avg_feature"]),
                               means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-5)

    denoise = _main_of(DENOISE)
    denoise(["--T", "0.9", "--SD", SD, "--output", out])
    mask = np.load(files["credible_ratio_90_feature"])
    assert mask.dtype == np.uint8 and mask.shape == (35,)
    assert [int(mask[labels == c].sum()) for c in range(5)] == [7] * 5   # ceil(0.9·7) = 7
    denoise(["--T", "0.5", "--SD", SD, "--output", out, "--column_norm"])
    half = np.load(os.path.join(out, f"{SD}_credible_ratio_50_feature.npy"))
    assert [int(half[labels == c].sum()) for c in range(5)] == [4] * 5   # ceil(3.5) = 4


def test_torchrun_two_ranks_and_avg_with_config(setup):
    root, cfg = setup
    out = str(root / "torchrun")
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                AVG, cfg, "--SD", SD, "--output", out, "--batch_size", "4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = _files(out)
    expected, expected_labels = _reference(root)
    np.testing.assert_allclose(np.load(files["feature"]), expected, atol=1e-5)
    assert np.array_equal(np.load(files["label"]), expected_labels)
    assert np.load(files["avg_feature"]).shape == (5, 16)


def _embed_worker(rank, world, port, root, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from backbones import load_backbone
    from utils.dataset import MXFaceDataset
    from utils.distributed import cleanup, init_distributed
    from utils.embedding import embed_dataset

    info = init_distributed(device="cpu")
    dataset = MXFaceDataset(os.path.join(root, "data", "train_part_70_class"), train=False, input_size=32)
    model = load_backbone(os.path.join(root, "old", "model.pt"), "r18", 8, 32)
    # chunks of 4 rows: several gather rounds, the last one partly padded and one rank idle
    result = embed_dataset(model, dataset, batch_size=5, dist_info=info, num_workers=0, chunk_rows=4)
    if rank == 0:
        np.save(out_path, result)
    else:
        assert result is None
    cleanup()


def test_embed_dataset_two_gloo_ranks_equals_single(setup):
    from backbones import load_backbone
    from utils.dataset import MXFaceDataset
    from utils.distributed import DistInfo
    from utils.embedding import embed_dataset

    root = setup[0]
    dataset = MXFaceDataset(str(root / "data" / "train_part_70_class"), train=False, input_size=32)
    model = load_backbone(str(root / "old" / "model.pt"), "r18", 8, 32)
    single = embed_dataset(model, dataset, 5, DistInfo(0, 0, 1, torch.device("cpu")), num_workers=0)
    assert single.shape == (35, 16) and single.dtype == np.float32
    out = str(root / "embed_2.npy")
    mp.spawn(_embed_worker, args=(2, free_port(), str(root), out), nprocs=2, join=True)
    double = np.load(out)
    np.testing.assert_allclose(double, single, atol=1e-5)
    np.testing.assert_allclose(single, _reference(root)[0], atol=1e-5)


def test_bad_input_errors(setup, tmp_path):
    root, cfg = setup
    get_main, avg_main, denoise_main = _main_of(GET), _main_of(AVG), _main_of(DENOISE)
    out = str(tmp_path / "features")
    os.makedirs(out)
    with pytest.raises(UserError, match="f32"):                      # model makes 16-d embeddings
        get_main([cfg, "--SD", "f32_r18_softmax_class70", "--output", out])
    with pytest.raises(UserError, match="--SD"):
        get_main([cfg, "--SD", "f16_r18_softmax_class50", "--output", out])
    missing = write_config(tmp_path / "missing.py", **TINY_MODEL, rec=cfg, output=str(tmp_path / "none"))
    with pytest.raises(UserError, match="old model not found"):
        get_main([missing, "--SD", SD, "--output", out])
    with pytest.raises(UserError, match="training data not found"):
        get_main([cfg, "--SD", "f16_r18_softmax_data70", "--output", out])
    with pytest.raises(UserError, match="feature file not found"):
        avg_main(["--SD", SD, "--output", out])
    for T in ("1.2", "-0.5"):
        with pytest.raises(UserError, match="--T must be in"):
            denoise_main(["--T", T, "--SD", SD, "--output", out])

    np.save(os.path.join(out, f"{SD}_feature.npy"), np.ones((4, 16), np.float32))
    np.save(os.path.join(out, f"{SD}_label.npy"), np.zeros(3, np.int64))
    with pytest.raises(UserError, match="has 4 rows but .* has 3 labels"):
        denoise_main(["--SD", SD, "--output", out])
    bad = np.ones((4, 16), np.float32)
    bad[2, 5] = np.nan
    np.save(os.path.join(out, f"{SD}_feature.npy"), bad)
    np.save(os.path.join(out, f"{SD}_label.npy"), np.array([0, 0, 2, 2]))
    with pytest.raises(UserError, match=f"{SD}_feature.npy: row 2 contains NaN or inf"):
        denoise_main(["--SD", SD, "--output", out])
    with pytest.raises(UserError, match="row 2 contains NaN"):
        avg_main(["--SD", SD, "--output", out])
    np.save(os.path.join(out, f"{SD}_feature.npy"), np.ones((4, 16), np.float32))
    with pytest.raises(UserError, match="class 1"):                  # labels 0 and 2 only
        avg_main(["--SD", SD, "--output", out])
    assert sorted(os.listdir(out)) == [f"{SD}_feature.npy", f"{SD}_label.npy"]   # nothing written

    proc = python(DENOISE, "--T", "2", "--SD", SD, "--output", out)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --T must be in [0, 1], got 2.0"


class _CrashAfter(torch.nn.Module):
    """Wraps a model; counts forward passes and raises on pass number ``crash_at`` (None: never)."""

    def __init__(self, model, crash_at=None):
        super().__init__()
        self.model, self.crash_at, self.calls, self.images = model, crash_at, 0, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated preemption")
        self.images += len(x)
        return self.model(x)


def _extract_with(monkeypatch, wrapper, cfg, out, cache, *extra):
    """get_feature.py in-process with the loaded old model wrapped by ``wrapper``."""
    import backbones

    real = backbones.load_backbone
    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: wrapper(real(*a, **k)))
    try:
        _main_of(GET)([cfg, "--SD", SD, "--output", out, "--batch_size", "3", "--chunk_size", "8",
                       "--cache_dir", cache, *extra])
    finally:
        monkeypatch.setattr(backbones, "load_backbone", real)


def test_interrupted_extraction_resumes_from_cached_chunks(setup, tmp_path, monkeypatch, capsys):
    root, cfg = setup
    out, cache = str(tmp_path / "features"), str(tmp_path / "cache")
    crashed = []
    with pytest.raises(KeyboardInterrupt):
        # forward 1 probes the embedding size, 2 the row dimension; 3.. embed batches of 3 rows
        _extract_with(monkeypatch, lambda m: crashed.append(_CrashAfter(m, crash_at=9)) or crashed[-1],
                      cfg, out, cache)
    assert not os.path.exists(out)                                  # no feature file yet
    # 6 batches = 18 rows → 2 of 5 chunks saved
    assert [os.path.basename(p) for p in chunk_files(cache)] == ["chunk_000000.npz", "chunk_000001.npz"]

    resumed = []
    _extract_with(monkeypatch, lambda m: resumed.append(_CrashAfter(m)) or resumed[-1], cfg, out, cache)
    assert "resuming: 2 of 5 chunks already done" in capsys.readouterr().out
    assert resumed[0].images == 3 + 19    # the probes (2 + 1 images), then rows 16..34 only
    files = _files(out)
    expected, labels = _reference(root)
    np.testing.assert_allclose(np.load(files["feature"]), expected, atol=1e-5)
    assert np.array_equal(np.load(files["label"]), labels)
    assert chunk_files(cache) == []                                 # removed once the output is written


def test_resume_under_torchrun_and_unusable_chunks(setup, tmp_path, monkeypatch):
    """Chunks left by a single-process run are reused by 2 ranks; a corrupt chunk is embedded again;
    a rewritten model never reuses the chunks of the old one."""
    root, cfg = setup
    out, cache = str(tmp_path / "features"), str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        _extract_with(monkeypatch, lambda m: _CrashAfter(m, crash_at=12), cfg, out, cache)
    chunks = chunk_files(cache)
    assert len(chunks) == 3
    with open(chunks[1], "r+b") as handle:                  # truncate chunk 1
        handle.truncate(100)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                GET, cfg, "--SD", SD, "--output", out, "--batch_size", "3", "--chunk_size", "8",
                "--cache_dir", cache])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming: 2 of 5 chunks already done" in proc.stdout
    np.testing.assert_allclose(np.load(_files(out)["feature"]), _reference(root)[0], atol=1e-5)
    assert chunk_files(cache) == []

    with pytest.raises(KeyboardInterrupt):
        _extract_with(monkeypatch, lambda m: _CrashAfter(m, crash_at=6), cfg, out, cache)
    assert len(chunk_files(cache)) == 1
    model_file = root / "old" / "model.pt"
    stat = os.stat(model_file)
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))   # "retrained"
    fresh = []
    _extract_with(monkeypatch, lambda m: fresh.append(_CrashAfter(m)) or fresh[-1], cfg, out, cache)
    assert fresh[0].images == 3 + 35


def test_sigkilled_extraction_resumes_to_the_same_file(tmp_path):
    """A real get_feature.py process killed with SIGKILL mid-way; the rerun reuses its chunks and
    writes the same file as an uninterrupted run."""
    import signal
    import subprocess
    import time

    from backbones import get_model

    make_tiny_rec(str(tmp_path / "data"), num_classes=40, per_class=30, name="train_part_70_class")
    torch.manual_seed(0)
    os.makedirs(tmp_path / "old")
    torch.save(get_model("r18", num_features=16, width=8, input_size=32).state_dict(), tmp_path / "old" / "model.pt")
    cfg = write_config(tmp_path / "old_cfg.py", **TINY_MODEL, rec=str(tmp_path / "data" / "train_part_30_class"),
                       output=str(tmp_path / "old"), num_workers=0, fp16=False)
    cache = str(tmp_path / "cache")
    argv = [sys.executable, GET, cfg, "--SD", SD, "--batch_size", "2", "--chunk_size", "60", "--cache_dir", cache]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv + ["--output", str(tmp_path / "killed")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(chunk_files(cache)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction ended before it could be killed"
    saved = len(chunk_files(cache))
    assert 3 <= saved < 20 and not os.path.exists(tmp_path / "killed" / f"{SD}_feature.npy")

    resumed = run(argv + ["--output", str(tmp_path / "killed")], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming: {saved} of 20 chunks already done" in resumed.stdout
    uninterrupted = run(argv + ["--output", str(tmp_path / "fresh"), "--cache_dir", str(tmp_path / "cache2")],
                        timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    killed, fresh = (tmp_path / name / f"{SD}_feature.npy" for name in ("killed", "fresh"))
    assert killed.read_bytes() == fresh.read_bytes()
    assert chunk_files(cache) == []


def test_steps_3_and_4_start_without_torch(tmp_path):
    """get_avg_feature.py and denoise_credible.py need numpy/scipy only: torch stays unimported."""
    labels = np.repeat(np.arange(3), 4)
    features = np.random.default_rng(0).normal(size=(12, 16)).astype(np.float32)
    np.save(tmp_path / f"{SD}_feature.npy", features)
    np.save(tmp_path / f"{SD}_label.npy", labels)
    for script in (AVG, DENOISE):
        code = (f"import runpy, sys; sys.argv = [{script!r}, '--SD', {SD!r}, '--output', {str(tmp_path)!r}]; "
                f"runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__'); "
                "print('torch imported' if 'torch' in sys.modules else 'no torch')")
        proc = python("-c", code)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "no torch"
