"""The shared training loop through the old-model scripts: launchers, outputs, resume, bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, make_tiny_rec, python, run, tiny_train_config
from utils.io import safe_torch_load


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return make_tiny_rec(str(tmp_path_factory.mktemp("data")), num_classes=6, per_class=8)


def assert_model(output):
    state = safe_torch_load(os.path.join(output, "model.pt"))
    assert state["fc.weight"].shape[0] == 16
    assert not any(k.startswith(("module.", "classifier", "weight")) for k in state)
    return state


def test_plain_python_arcface_run(tmp_path, tiny_rec):
    cfg = tiny_train_config(tmp_path / "tiny_arc.py", tiny_rec, str(tmp_path / "out"))
    proc = python("train_old_arc.py", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_model(tmp_path / "out")
    log = (tmp_path / "out" / "training.log").read_text()
    assert "Speed" in log and "samples/sec" in log and "Required:" in log and "cls" in log
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "out" / "tensorboard"))


@pytest.mark.parametrize("launcher", ["torchrun", "launch"])
def test_two_process_softmax_run(tmp_path, tiny_rec, launcher):
    cfg = tiny_train_config(tmp_path / "tiny_softmax.py", tiny_rec, str(tmp_path / "out"), batch_size=4)
    head = ["-m", "torch.distributed.run"] if launcher == "torchrun" else ["-m", "torch.distributed.launch"]
    port = str(29500 + os.getpid() % 1000 + (7 if launcher == "launch" else 0))
    proc = python(*head, "--nproc_per_node=2", "--nnodes=1", f"--master_port={port}",
                  "train_old_softmax.py", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_model(tmp_path / "out")
    assert "2 process(es)" in (tmp_path / "out" / "training.log").read_text()


def _train(tmp_path, rec, name, **overrides):
    cfg = tiny_train_config(tmp_path / f"{name}.py", rec, str(tmp_path / name), **overrides)
    return cfg, str(tmp_path / name)


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


RESUME_KEYS = dict(num_epoch=4, save_every_steps=1, keep_checkpoints=3, input_size=48, num_workers=1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_rec):
    """Weights of an uninterrupted run with RESUME_KEYS."""
    folder = tmp_path_factory.mktemp("reference")
    cfg, out = _train(folder, tiny_rec, "ref", **RESUME_KEYS)
    assert python("train_old_arc.py", cfg).returncode == 0
    return assert_model(out)


def test_resume_after_max_steps_equals_uninterrupted(tmp_path, tiny_rec, reference):
    cfg, out = _train(tmp_path, tiny_rec, "cut", max_steps=7, **RESUME_KEYS)
    assert python("train_old_arc.py", cfg).returncode == 0
    cfg_full = tiny_train_config(tmp_path / "cut.py", tiny_rec, out, **RESUME_KEYS)
    proc = python("train_old_arc.py", cfg_full, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step 7 (epoch 1, batch 1)" in proc.stdout
    assert _max_diff(reference, assert_model(out)) <= 1e-6


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_rec, reference, sig):
    cfg, out = _train(tmp_path, tiny_rec, "killed", **RESUME_KEYS)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train_old_arc.py", cfg], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = os.path.join(out, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(folder) and any(n.startswith("step_000000004") for n in os.listdir(folder)):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and "--resume" in stdout
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "model.pt"))
    resumed = python("train_old_arc.py", cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    assert _max_diff(reference, assert_model(out)) <= 1e-6


def test_corrupt_latest_checkpoint_falls_back(tmp_path, tiny_rec):
    cfg, out = _train(tmp_path, tiny_rec, "fallback", max_steps=5, **RESUME_KEYS)
    assert python("train_old_arc.py", cfg).returncode == 0
    latest = sorted(os.listdir(os.path.join(out, "checkpoints")))[-1]
    assert latest.startswith("step_000000005")
    with open(os.path.join(out, "checkpoints", latest), "r+b") as handle:
        handle.truncate(100)
    cfg = tiny_train_config(tmp_path / "fallback.py", tiny_rec, out, **RESUME_KEYS)
    proc = python("train_old_arc.py", cfg, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unusable" in proc.stdout and "resumed from step 4" in proc.stdout


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_give_one_line(tmp_path, tiny_rec):
    cases = [
        (dict(rec=str(tmp_path / "nowhere")), ["nowhere"]),
        (dict(network="r999"), ["r999"]),
        (dict(num_classes=4), ["num_classes"]),
    ]
    for i, (keys, fragments) in enumerate(cases):
        cfg = tiny_train_config(tmp_path / f"bad{i}.py", keys.pop("rec", tiny_rec), str(tmp_path / f"bad{i}"), **keys)
        _one_line_error(python("train_old_arc.py", cfg), *fragments)
        assert not os.path.exists(tmp_path / f"bad{i}" / "model.pt")
    (tmp_path / "typo.py").write_text("from easydict import EasyDict as edict\nconfig = edict()\nconfig.batchsize = 3\n")
    _one_line_error(python("train_old_arc.py", str(tmp_path / "typo.py")), "batchsize")
    _one_line_error(python("train_old_arc.py", str(tmp_path / "missing.py")), "missing.py")


GROUP_KEYS = dict(RESUME_KEYS, num_epoch=3, batch_size=4, num_workers=2)


def _torchrun(cfg, *extra, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            f"--master_port={port}", "train_old_arc.py", cfg, *extra]


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory, tiny_rec):
    """Weights of an uninterrupted 2-process run with 2 loader workers per process."""
    folder = tmp_path_factory.mktemp("group_reference")
    cfg, out = _train(folder, tiny_rec, "ref", **GROUP_KEYS)
    proc = run(_torchrun(cfg, port=29300 + os.getpid() % 500))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return assert_model(out)


def test_signals_to_the_whole_job_resume_to_the_same_weights(tmp_path, tiny_rec, two_rank_reference):
    """As Slurm's preemption (SIGTERM) or Ctrl-C (SIGINT): every process of the job (launcher, 2 ranks,
    their loader workers) gets the signal mid-run; the run stops with a checkpoint, and ``--resume``
    (interrupted once more, by the other signal) ends where the uninterrupted run ends."""
    cfg, out = _train(tmp_path, tiny_rec, "job", **GROUP_KEYS)
    port = 29800 + os.getpid() % 500
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    folder, log = os.path.join(out, "checkpoints"), tmp_path / "job" / "training.log"
    for attempt, (sig, step) in enumerate([(signal.SIGTERM, 4), (signal.SIGINT, 11)]):
        job = subprocess.Popen(_torchrun(cfg, *(["--resume"] if attempt else []), port=port + attempt), cwd=ROOT,
                               env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None:
            if os.path.isdir(folder) and any(n.startswith(f"step_{step:09d}_rank1") for n in os.listdir(folder)):
                break
            time.sleep(0.01)
        assert job.poll() is None, "training finished before it could be interrupted"
        os.killpg(job.pid, sig)
        _, stderr = job.communicate(timeout=300)
        assert job.returncode != 0
        assert log.read_text().count("stopped by SIG") == attempt + 1, stderr[-3000:]
        assert f"stopped by {sig.name}" in log.read_text()
        assert not os.path.exists(os.path.join(out, "model.pt"))
    resumed = run(_torchrun(cfg, "--resume", port=port + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log.read_text().count("resumed from step") == 2
    assert _max_diff(two_rank_reference, assert_model(out)) <= 1e-6
