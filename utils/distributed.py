"""Process-group setup for every launcher, and every helper that talks across processes.

Works under ``python -m torch.distributed.launch`` (``--local_rank``/``--local-rank``), ``torchrun``
(env vars, multi-node) and a plain ``python script.py config.py`` (world size 1: a private file
store, so no port is ever taken). NCCL on CUDA, gloo on CPU; gloo also on CUDA when this node runs
more processes than it has GPUs (NCCL cannot put two processes on one GPU) or when
``BCT_DIST_BACKEND=gloo`` is set.

The helpers below work with or without an initialised process group (one process: no-ops).
"""
import atexit
import contextlib
import dataclasses
import datetime
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from utils.config import add_launcher_args  # noqa: F401  (torch-free, for commands that may not launch)
from utils.errors import UserError

BACKEND_VARIABLE = "BCT_DIST_BACKEND"
_STORE_FOLDER = None   # the private file store of a one-process run, removed by cleanup() or at exit

if dist.is_available():
    # torch.distributed.nn binds the default process group into function defaults when it is first
    # imported, and DDP imports it lazily. Imported after init_process_group, it keeps the group
    # alive past destroy_process_group, and a gloo worker thread finishing its last collective
    # while the interpreter shuts down aborts the process (SIGABRT after a successful run).
    import torch.distributed.nn  # noqa: F401


@dataclasses.dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def choose_device(requested=None, local_rank=0):
    """``requested`` ('cpu', 'cuda', 'cuda:1') or the default: this rank's GPU if any, else CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device '{requested}' requested but CUDA is not available")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def choose_backend(device):
    """``$BCT_DIST_BACKEND`` if set; else NCCL for CUDA unless this node has more processes than GPUs; else gloo."""
    requested = os.environ.get(BACKEND_VARIABLE)
    if requested:
        if requested not in ("nccl", "gloo"):
            raise UserError(f"{BACKEND_VARIABLE}={requested!r}: expected nccl or gloo")
        return requested
    if device.type != "cuda":
        return "gloo"
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "nccl" if local_processes <= torch.cuda.device_count() else "gloo"


def init_distributed(local_rank=None, device=None, timeout_minutes=30):
    """Initialise (once) the default process group and return this process's :class:`DistInfo`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and device and torch.device(device).type == "cuda" and torch.device(device).index is not None:
        raise UserError(f"device = '{device}' would put all {world_size} processes on one GPU; set device = 'cuda' "
                        "(each process takes the GPU of its local rank) or launch a single process")
    dev = choose_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = choose_backend(dev)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world_size > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, init_method="env://", rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            global _STORE_FOLDER
            _STORE_FOLDER = tempfile.mkdtemp(prefix="bct-pg-")
            atexit.register(shutil.rmtree, _STORE_FOLDER, ignore_errors=True)  # a process that never calls cleanup()
            store = os.path.join(_STORE_FOLDER, "store")
            dist.init_process_group(backend, init_method="file://" + store, rank=0,
                                    world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev)


@contextlib.contextmanager
def launched(local_rank=None, device=None):
    """This process's :class:`DistInfo` when a launcher started it (``--local_rank`` given, or
    ``WORLD_SIZE`` > 1 under torchrun), else None (one process, no group); the group is destroyed on exit."""
    if local_rank is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    try:
        yield init_distributed(local_rank, device)
    finally:
        cleanup()


def cleanup():
    """Destroy the process group if one is initialised, and remove a one-process run's store folder."""
    global _STORE_FOLDER
    if dist.is_initialized():
        dist.destroy_process_group()
    if _STORE_FOLDER:
        shutil.rmtree(_STORE_FOLDER, ignore_errors=True)
        _STORE_FOLDER = None


def world():
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device(device):
    """Where tensors for a collective must live: ``device`` under NCCL, the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device(device)
    return torch.device("cpu")


def all_reduce(tensor, op=None):
    """In-place all-reduce of ``tensor`` (sum by default) when several processes run; returns it."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


def broadcast(tensor, src=0):
    """In-place broadcast of ``tensor`` from rank ``src`` when several processes run; returns it."""
    if world()[1] > 1:
        dist.broadcast(tensor, src)
    return tensor


def gather(tensor, dst=0):
    """Every rank's ``tensor`` (same shape on every rank), in rank order, on rank ``dst``; None on the others.
    ``[tensor]`` with one process."""
    rank, size = world()
    if size == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(size)] if rank == dst else None
    dist.gather(tensor, parts, dst=dst)
    return parts


def all_gather_rows(tensor):
    """Concatenation of every rank's ``tensor`` along dim 0 (same shape on every rank)."""
    size = world()[1]
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _agree(flag, op, device):
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=comm_device(device))
    return bool(all_reduce(tensor, op).item())


def any_rank(flag, device="cpu"):
    """True on every rank if ``flag`` is true on any rank."""
    return _agree(flag, dist.ReduceOp.MAX, device) if world()[1] > 1 else bool(flag)


def every_rank(flag, device="cpu"):
    """True on every rank if ``flag`` is true on every rank."""
    return _agree(flag, dist.ReduceOp.MIN, device) if world()[1] > 1 else bool(flag)


def common_to_all_ranks(values):
    """The values present on every rank (each rank passes its own collection), sorted, largest first."""
    if world()[1] == 1:
        return sorted(set(values), reverse=True)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(set(values)))
    return sorted(set(gathered[0]).intersection(*map(set, gathered[1:])), reverse=True)


def average_gradients(params):
    """Average the gradients of ``params`` (replicated modules outside DDP) over the processes."""
    size = world()[1]
    if size == 1:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= size


def compute_on_main(fn, device):
    """Run ``fn() -> list of tensors`` on rank 0 only and return those tensors, on ``device``, on every rank.

    A :class:`UserError` raised by ``fn`` on rank 0 is raised on every rank (no rank waits forever).
    """
    rank, size = world()
    tensors, message = None, None
    if rank == 0:
        try:
            tensors = [torch.as_tensor(t) for t in fn()]
        except UserError as exc:
            message = str(exc)
    if size > 1:
        comm = comm_device(device)
        meta = [message if message else [(tuple(t.shape), t.dtype) for t in tensors] if rank == 0 else None]
        dist.broadcast_object_list(meta, src=0, device=comm if comm.type == "cuda" else None)
        if isinstance(meta[0], str):
            message = meta[0]
        elif rank != 0:
            tensors = [torch.empty(shape, dtype=dtype) for shape, dtype in meta[0]]
    if message:
        raise UserError(message)
    out = []
    for tensor in tensors:
        if size > 1:
            tensor = tensor.to(comm).contiguous()
            dist.broadcast(tensor, 0)
        out.append(tensor.to(device).contiguous())
    return out
