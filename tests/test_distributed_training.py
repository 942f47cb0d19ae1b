"""CUDA/multi-process paths of the training loop that a CPU can check: cuBLAS determinism set-up,
per-device RNG state, AMP overflow agreement over ranks (replicated modules and classifier shards), errors
raised on every rank, resume with per-node checkpoint folders."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import utils.trainer as trainer
from tests.helpers import python, tiny_train_config
from utils.checkpoint import CheckpointManager, rng_state, set_rng_state
from utils.config import get_config
from utils.distributed import cleanup, fail_together
from utils.errors import UserError, require


class _Reached(Exception):
    pass


@pytest.mark.parametrize("user_value", [None, ":16:8"])
def test_deterministic_sets_cublas_workspace_before_cuda(tmp_path, monkeypatch, user_value):
    """The variable must be set before the process group (the first CUDA call); a user's value is kept."""
    if user_value is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", user_value)
    seen = {}

    def first_cuda_call(*args, **kwargs):
        seen["value"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        raise _Reached

    monkeypatch.setattr(trainer, "init_distributed", first_cuda_call)
    cfg = get_config(tiny_train_config(tmp_path / "det.py", "unused", str(tmp_path / "out"), deterministic=True))
    try:
        with pytest.raises(_Reached):
            trainer.train(cfg, trainer.Method(cfg), None, None)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen["value"] == (user_value or ":4096:8")


class _FakeCuda:
    """torch.cuda's RNG functions over ``count`` visible devices (each state a distinct tensor)."""

    def __init__(self, count):
        self.states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(count)}

    def device_count(self):
        return len(self.states)

    def _index(self, device):
        index = torch.device(device).index or 0 if not isinstance(device, int) else device
        if index not in self.states:
            raise IndexError(f"device {index} is not visible ({len(self.states)} devices)")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(len(self.states))]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def test_rng_state_is_the_rank_own_gpu(monkeypatch):
    """Rank 2 of a 4-GPU node saves its GPU's state; resumed with one visible GPU it restores it there."""
    saving = _FakeCuda(4)
    for name in ("device_count", "get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(saving, name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = rng_state(torch.device("cuda", 2))
    cpu_state = torch.get_rng_state()
    resuming = _FakeCuda(1)
    for name in ("device_count", "get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(resuming, name))
    set_rng_state(state, torch.device("cuda", 0))
    assert resuming.states[0].tolist() == [2, 2, 2, 2]
    assert torch.equal(torch.get_rng_state(), cpu_state)


def _one_sided_overflow(rank, replicated, agree=True):
    """One AMP step where only rank 1's second module has an infinite gradient: a method module replicated
    on every rank (its gradients averaged over the ranks), or a classifier shard that only this rank holds."""
    torch.manual_seed(0)
    backbone = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    other = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD([*backbone.parameters(), *other.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    inputs = torch.ones(2, 3)
    blow_up = torch.tensor(float("inf") if rank == 1 else 1.0)
    loss = backbone(inputs).sum() + (other(inputs) * blow_up).sum()
    trainer.optimizer_step(loss, optimizer, scaler, backbone.parameters(), clip_grad=0,
                           replicated_params=list(other.parameters()) if replicated else (), agree_overflow=agree)
    return {"scale": scaler.get_scale(), "backbone": backbone.module.weight.detach().tolist(),
            "other": other.weight.detach().tolist(), "finite": bool(torch.isfinite(other.weight).all())}


def _fail_on_rank_one(rank):
    """fail_together: a UserError on rank 1 only is raised on both ranks."""
    try:
        with fail_together():
            require(rank != 1, "feature file missing on this node")
    except UserError as exc:
        return str(exc)
    return None


def _per_node_checkpoints(rank, folder):
    """Each rank writes to its own folder (a node's local disk) and resumes from it."""
    own = os.path.join(folder, f"node{rank}")
    manager = CheckpointManager(own, rank, keep=3)
    for step in (1, 2, 3):
        manager.save(step, {"step": step, "rank": rank})
    latest = manager.load_latest()
    if rank == 1:
        os.remove(manager.path(3))  # rank 1 lost step 3: both must fall back to step 2
    dist.barrier()
    fallback = manager.load_latest()
    return {"latest": latest, "fallback": fallback}


def _worker(rank, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method="file://" + os.path.join(folder, "store"), rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        result = {"overflow": _one_sided_overflow(rank, replicated=True), "checkpoints": _per_node_checkpoints(rank, folder),
                  "shard_overflow": {str(agree): _one_sided_overflow(rank, False, agree) for agree in (True, False)},
                  "fail_together": _fail_on_rank_one(rank)}
    finally:
        cleanup()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("two_ranks"))
    mp.spawn(_worker, args=(folder,), nprocs=2)
    results = []
    for rank in range(2):
        with open(os.path.join(folder, f"rank{rank}.json")) as handle:
            results.append(json.load(handle))
    return results


def test_amp_overflow_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    first, second = (result["overflow"] for result in two_ranks)
    assert first["scale"] == second["scale"] == 32768.0
    assert first["finite"] and second["finite"]
    assert first["other"] == second["other"]


def test_overflow_in_one_rank_shard_skips_the_step_on_every_rank(two_ranks):
    """agree_overflow (default): same scale and backbone weights on both ranks; without it (the published
    loop) rank 0 steps at 65,536 while rank 1 skips and halves its scale, and the replicas drift apart."""
    first, second = (result["shard_overflow"]["True"] for result in two_ranks)
    assert first["scale"] == second["scale"] == 32768.0
    assert first["backbone"] == second["backbone"]
    first, second = (result["shard_overflow"]["False"] for result in two_ranks)
    assert (first["scale"], second["scale"]) == (65536.0, 32768.0)
    assert first["backbone"] != second["backbone"]


def test_user_error_on_one_rank_is_raised_on_every_rank(two_ranks):
    first, second = (result["fail_together"] for result in two_ranks)
    assert first == "feature file missing on this node (on rank 1)"
    assert second == "feature file missing on this node"


def test_resume_with_per_node_checkpoint_folders(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert result["checkpoints"]["latest"] == {"step": 3, "rank": rank}
        assert result["checkpoints"]["fallback"] == {"step": 2, "rank": rank}


def test_one_process_store_folder_is_removed():
    """A plain one-process run's private file store (bct-pg-*) is removed by cleanup()."""
    code = ("import os, utils.distributed as d; d.init_distributed(device='cpu'); folder = d._STORE_FOLDER; "
            "assert os.path.isdir(folder); d.cleanup(); print(os.path.exists(folder))")
    proc = python("-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_one_process_store_folder_is_removed_at_exit_without_cleanup():
    """A process that never calls cleanup() (a test training in-process, a crash) leaves no bct-pg-* folder."""
    code = ("import os, utils.distributed as d; d.init_distributed(device='cpu'); "
            "assert os.path.isdir(d._STORE_FOLDER); print(d._STORE_FOLDER)")
    proc = python("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = proc.stdout.strip()
    assert os.path.basename(folder).startswith("bct-pg-") and not os.path.exists(folder)


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from utils import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.choose_device("cuda", 1) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="local rank 2 has no GPU of its own .this node has 2.; launch at most 2"):
        distributed.choose_device("cuda", 2)


def test_two_processes_on_one_gpu_point_to_the_backend_override(monkeypatch):
    from utils import distributed

    def nccl_refuses(tensor, op=None):
        raise RuntimeError("NCCL error in: ...: invalid usage, NCCL version 2.21.5 ... Duplicate GPU detected : "
                           "rank 1 and rank 0 both on CUDA device 1a000")
    monkeypatch.setattr(distributed, "all_reduce", nccl_refuses)
    with pytest.raises(UserError, match="BCT_DIST_BACKEND=gloo"):
        distributed._check_one_process_per_gpu(torch.device("cpu"))
