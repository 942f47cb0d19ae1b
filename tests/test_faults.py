"""How a failing run ends: every fault injected (tools/benchmark/faulty_train.py) ends every process within
seconds and non-zero, with a line saying why; a preempted run exits 143; a resume that does not
find the same checkpoints on every process stops every process."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, free_port, make_tiny_rec, run, tiny_train_config

FAULTY = os.path.join(ROOT, "tools", "benchmark", "faulty_train.py")


@pytest.fixture(scope="module")
def tiny_rec(tmp_path_factory):
    return make_tiny_rec(str(tmp_path_factory.mktemp("data")), num_classes=6, per_class=16)


def _config(tmp_path, rec, name="run", **keys):
    keys = dict(dict(num_workers=2, batch_size=4, num_epoch=3), **keys)
    return tiny_train_config(tmp_path / f"{name}.py", rec, str(tmp_path / name), **keys), tmp_path / name


def _torchrun(script, cfg, *extra, nodes=1, node_rank=0, nproc=2, port):
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}", script, cfg, *extra]


def _timed(args, fault, step=5, rank=0, timeout=120):
    env = dict(FAULT=fault, FAULT_STEP=str(step), FAULT_RANK=str(rank))
    start = time.monotonic()
    proc = run(args, env=env, timeout=timeout)
    return proc, time.monotonic() - start


def test_exception_with_loader_workers_exits_at_once(tmp_path, tiny_rec):
    """Before the fix the traceback kept the SIGTERM-ignoring workers alive and the exit waited forever."""
    cfg, _ = _config(tmp_path, tiny_rec)
    proc, seconds = _timed([sys.executable, FAULTY, cfg], "raise")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("RuntimeError: injected fault at step 5")
    assert seconds < 45, seconds


def test_one_rank_exception_ends_the_whole_job(tmp_path, tiny_rec):
    cfg, _ = _config(tmp_path, tiny_rec)
    proc, seconds = _timed(_torchrun(FAULTY, cfg, port=free_port()), "raise", rank=0)
    assert proc.returncode != 0
    assert "RuntimeError: injected fault at step 5" in proc.stderr
    assert seconds < 60, seconds


def test_killed_peer_ends_the_other_node(tmp_path, tiny_rec):
    """Two nodes of one process each; node 1's training process is killed: node 0 stops too, non-zero."""
    cfg, _ = _config(tmp_path, tiny_rec)
    port, env = free_port(), dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", FAULT="kill", FAULT_STEP="5",
                                  FAULT_RANK="1")
    start = time.monotonic()
    nodes = [subprocess.Popen(_torchrun(FAULTY, cfg, nodes=2, node_rank=n, nproc=1, port=port), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outputs = [node.communicate(timeout=120) for node in nodes]
    seconds = time.monotonic() - start
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    assert "remote worker" in outputs[0][1], outputs[0][1][-2000:]   # gloo's error on the surviving node
    assert seconds < 60, seconds


def test_hung_peer_ends_the_job_after_the_step_timeout(tmp_path, tiny_rec):
    """Rank 1 stalls inside a step: rank 0 waits step_timeout_minutes (here 3 s) in its collective, then stops;
    torchrun then ends rank 1."""
    cfg, _ = _config(tmp_path, tiny_rec, step_timeout_minutes=0.05)
    proc, seconds = _timed(_torchrun(FAULTY, cfg, port=free_port()), "stall", rank=1, timeout=180)
    assert proc.returncode != 0
    assert "imed out" in proc.stderr or "Timeout" in proc.stderr, proc.stderr[-3000:]
    assert seconds < 90, seconds


def test_preempted_run_exits_143_without_model(tmp_path, tiny_rec):
    cfg, out = _config(tmp_path, tiny_rec, num_epoch=50, save_every_steps=1)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train_old_arc.py", cfg], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    line, = stderr.strip().splitlines()
    assert line.startswith("stopped: stopped by SIGTERM at step") and "--resume" in line
    assert os.listdir(out / "checkpoints") and not (out / "model.pt").exists()


def _one_line(proc, fragment):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert lines and all(fragment in line for line in lines), proc.stderr[-3000:]
    return lines


def test_resume_that_finds_nothing_stops(tmp_path, tiny_rec):
    cfg, out = _config(tmp_path, tiny_rec, num_workers=0)
    _one_line(run([sys.executable, "train_old_arc.py", cfg, "--resume"]), "no checkpoint under")
    assert not (out / "model.pt").exists()
    auto = run([sys.executable, "train_old_arc.py", cfg, "--set", "resume=auto", "max_steps=2"])
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "resume = 'auto': no checkpoint" in (out / "training.log").read_text()


def test_resume_mismatch_between_ranks_stops_every_rank(tmp_path, tiny_rec):
    """Rank 1's checkpoints are gone (it landed on a node whose disk does not hold them): both ranks stop."""
    cfg, out = _config(tmp_path, tiny_rec, num_workers=0, max_steps=3, save_every_steps=1)
    first = run(_torchrun("train_old_arc.py", cfg, port=free_port()))
    assert first.returncode == 0, first.stderr[-3000:]
    for name in os.listdir(out / "checkpoints"):
        if "_rank1" in name:
            os.remove(out / "checkpoints" / name)
    os.remove(out / "model.pt")
    start = time.monotonic()
    proc = run(_torchrun("train_old_arc.py", cfg, "--resume", port=free_port()))
    assert proc.returncode != 0
    # both ranks raise the same error; torchrun may end the slower one before it prints its line
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert 1 <= len(lines) <= 2 and all("some processes found no checkpoint" in line and "rank 1: none" in line
                                        for line in lines), proc.stderr[-3000:]
    assert time.monotonic() - start < 60 and not (out / "model.pt").exists()
    shutil.rmtree(out / "checkpoints")
