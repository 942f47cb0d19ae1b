"""Config loading, atomic output, safe loading, schedules, the one-line error wrapper."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from utils.config import ROOT, get_config
from utils.errors import UserError
from utils.io import atomic_np_save, atomic_open, atomic_torch_save, safe_np_load, safe_torch_load
from utils.schedule import lr_multiplier


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_config_merges_base_and_resolves_paths(tmp_path):
    cfg = get_config(write(tmp_path / "my_run.py", """
        from easydict import EasyDict as edict
        config = edict()
        config.network = "r18"
        config.rec = "dataset/x/train_part_70_class"
        """))
    assert cfg.network == "r18" and cfg.lr == 0.1 and cfg.embedding_size == 512
    assert cfg.rec == os.path.join(ROOT, "dataset/x/train_part_70_class")
    assert cfg.output == os.path.join(ROOT, "work_dirs", "my_run")
    assert cfg.config_name == "my_run"


def test_config_unknown_key_is_an_error(tmp_path):
    path = write(tmp_path / "bad.py", """
        from easydict import EasyDict as edict
        config = edict()
        config.learning_rate = 0.1
        """)
    with pytest.raises(UserError, match="unknown key.*learning_rate"):
        get_config(path)


def test_config_folder_base_declares_method_keys(tmp_path):
    write(tmp_path / "base.py", """
        from easydict import EasyDict as edict
        config = edict()
        config.mix_ratio = 0.3
        """)
    cfg = get_config(write(tmp_path / "run.py", """
        from easydict import EasyDict as edict
        config = edict()
        config.mix_ratio = 0.5
        """))
    assert cfg.mix_ratio == 0.5 and cfg.batch_size == 128


def test_every_shipped_root_config_loads():
    folder = os.path.join(ROOT, "configs")
    names = [n for n in os.listdir(folder) if n.endswith(".py") and n not in ("base.py", "__init__.py", "scenarios.py")]
    assert len(names) >= 9
    for name in names:
        cfg = get_config(os.path.join(folder, name))
        assert cfg.rec.startswith(os.path.join(ROOT, "dataset"))
        assert f"f{cfg.embedding_size}_" in name and cfg.network in name


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_safe_loaders_round_trip_and_refuse_pickles(tmp_path):
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert torch.equal(safe_torch_load(tmp_path / "m.pt")["w"], torch.ones(2))
    torch.save({"obj": UserError("x")}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="pickled"):
        safe_torch_load(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:50])
    with pytest.raises(UserError, match="corrupt"):
        safe_torch_load(tmp_path / "trunc.pt")
    atomic_np_save(tmp_path / "a.npy", np.arange(3))
    assert safe_np_load(tmp_path / "a.npy").tolist() == [0, 1, 2]
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="pickled"):
        safe_np_load(tmp_path / "obj.npy")


def test_poly_schedule_values():
    assert lr_multiplier(0, 100) == 1.0
    assert lr_multiplier(50, 100) == pytest.approx(0.25)
    assert lr_multiplier(100, 100) == 0.0
    # warm-up of 10 steps then (1 - (s-10)/90)^2
    assert lr_multiplier(4, 100, warmup_steps=10) == pytest.approx(0.5)
    assert lr_multiplier(55, 100, warmup_steps=10) == pytest.approx(0.25)


def test_warmup_starts_at_one_step_of_w():
    """Ours: step k of w warm-up steps at (k + 1)/w, so step 0 at 1/w and step w − 1 at the full rate (the
    published k/w starts at 0; docs/methods.md, differences row 17)."""
    w = 8
    assert lr_multiplier(0, 100, warmup_steps=w) == pytest.approx(1 / w)
    assert lr_multiplier(w - 1, 100, warmup_steps=w) == 1.0
    assert lr_multiplier(w, 100, warmup_steps=w) == 1.0   # the decay starts from the full rate


def test_step_schedule_values():
    kw = dict(total_steps=400, schedule="step", steps_per_epoch=10, lr_steps=(20, 26, 32))
    assert lr_multiplier(199, **kw) == 1.0
    assert lr_multiplier(200, **kw) == pytest.approx(0.1)
    assert lr_multiplier(265, **kw) == pytest.approx(0.01)
    assert lr_multiplier(320, **kw) == pytest.approx(0.001)


def test_run_cli_prints_one_line(tmp_path):
    code = "from utils.errors import run_cli, UserError\n" \
           "def main():\n    raise UserError('bad value 7 (expected < 5)')\nrun_cli(main)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: bad value 7 (expected < 5)"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to list threads")
def test_cleanup_stops_the_gloo_threads_after_ddp():
    """A DDP-wrapped run must not leave the process group (and its gloo threads) alive for interpreter
    shutdown, where a thread finishing its last collective aborts the process."""
    code = textwrap.dedent("""
        import os
        import torch
        from utils.distributed import cleanup, init_distributed
        def gloo_threads():
            names = (open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task"))
            return sum("gloo" in name for name in names)
        init_distributed(device="cpu")
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        model(torch.randn(4, 3)).sum().backward()
        running = gloo_threads()
        del model
        cleanup()
        print(running, gloo_threads())
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    running, left = map(int, proc.stdout.split())
    assert running > 0 and left == 0
