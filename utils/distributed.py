"""Process-group setup for every launcher, and every helper that talks across processes.

Works under ``python -m torch.distributed.launch`` (``--local_rank``/``--local-rank``), ``torchrun``
(env vars, multi-node) and a plain ``python script.py config.py`` (world size 1: a private file
store, so no port is ever taken). NCCL on CUDA, gloo on CPU; gloo also on CUDA when this node runs
more processes than it has GPUs (NCCL cannot put two processes on one GPU) or when
``BCT_DIST_BACKEND=gloo`` is set.

Collectives wait at most ``timeout_minutes`` (:data:`DEFAULT_TIMEOUT_MINUTES` outside the training
steps; the loop sets its own with :func:`set_timeout`), so a peer that died or hangs ends the job.
A check that can fail on one process only runs inside :func:`fail_together`.

The helpers below work with or without an initialised process group (one process: no-ops).
"""
import atexit
import contextlib
import dataclasses
import datetime
import os
import shutil
import socket
import tempfile

import torch
import torch.distributed as dist

from utils.config import add_launcher_args  # noqa: F401  (torch-free, for commands that may not launch)
from utils.errors import UserError

BACKEND_VARIABLE = "BCT_DIST_BACKEND"
DEFAULT_TIMEOUT_MINUTES = 10   # collectives outside the training steps (setup, extraction, evaluation)
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
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise UserError(f"device '{requested}': local rank {local_rank} has no GPU of its own (this node has "
                                f"{count}); launch at most {count} processes per node (--nproc_per_node)")
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


def init_distributed(local_rank=None, device=None, timeout_minutes=None):
    """Initialise (once) the default process group and return this process's :class:`DistInfo`.

    ``timeout_minutes`` (default :data:`DEFAULT_TIMEOUT_MINUTES`) bounds the wait for the other
    processes to join and every collective after it (see :func:`set_timeout`)."""
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
        timeout = datetime.timedelta(minutes=timeout_minutes or DEFAULT_TIMEOUT_MINUTES)
        if world_size > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, init_method="env://", rank=rank,
                                    world_size=world_size, timeout=timeout)
            if backend == "nccl":
                _check_one_process_per_gpu(dev)
        else:
            global _STORE_FOLDER
            _STORE_FOLDER = tempfile.mkdtemp(prefix="bct-pg-")
            atexit.register(shutil.rmtree, _STORE_FOLDER, ignore_errors=True)  # a process that never calls cleanup()
            store = os.path.join(_STORE_FOLDER, "store")
            dist.init_process_group(backend, init_method="file://" + store, rank=0,
                                    world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev)


def _check_one_process_per_gpu(device):
    """One line instead of NCCL's error when two processes (two "nodes" on one host) hold the same GPU."""
    try:
        all_reduce(torch.zeros(1, device=device))
    except RuntimeError as exc:
        if "duplicate gpu" not in str(exc).lower():
            raise
        raise UserError(f"two processes use the same GPU ({device}, e.g. two nodes of one host): NCCL cannot share a "
                        f"GPU; give each process its own GPU or set {BACKEND_VARIABLE}=gloo") from None


def free_port():
    """A TCP port free on 127.0.0.1 now (the master port of a process group started on this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_timeout(minutes):
    """Bound every later collective of the default group to ``minutes`` (where this torch can change it)."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None and world()[1] > 1:
        setter(datetime.timedelta(minutes=minutes))


@contextlib.contextmanager
def process_group(local_rank=None, device=None, timeout_minutes=None):
    """:func:`init_distributed` for the block, and :func:`cleanup` after it (``failed`` when it raises)."""
    info = init_distributed(local_rank, device, timeout_minutes)
    try:
        yield info
    except BaseException:
        cleanup(failed=True)
        raise
    cleanup()


@contextlib.contextmanager
def launched(local_rank=None, device=None, timeout_minutes=None):
    """This process's :class:`DistInfo` when a launcher started it (``--local_rank`` given, or
    ``WORLD_SIZE`` > 1 under torchrun), else None (one process, no group); the group is destroyed on exit."""
    if local_rank is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    with process_group(local_rank, device, timeout_minutes) as info:
        yield info


def cleanup(failed=False):
    """Destroy the process group if one is initialised, and remove a one-process run's store folder.

    ``failed``: this process is leaving on an error; an NCCL group is left to the process's exit instead
    of being destroyed (destroying it waits for collectives the peers may never join)."""
    global _STORE_FOLDER
    if dist.is_initialized() and not (failed and dist.get_backend() == "nccl"):
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


def _reduce_int(value, op, device):
    if world()[1] == 1:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=comm_device(device))
    return int(all_reduce(tensor, op).item())


def largest_on_any_rank(value, device="cpu"):
    """The largest of the ranks' integers ``value``, on every rank."""
    return _reduce_int(value, dist.ReduceOp.MAX, device)


def every_rank(flag, device="cpu"):
    """True on every rank if ``flag`` is true on every rank."""
    return bool(_reduce_int(bool(flag), dist.ReduceOp.MIN, device))


def from_every_rank(value):
    """The list of every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if world()[1] == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


@contextlib.contextmanager
def fail_together():
    """Run the block on every rank; a :class:`UserError` raised in it on any rank is raised on every rank.

    For checks that can fail on some processes only (a file on one node's disk): without it the others
    would wait for the failed one in their next collective until the timeout.
    """
    message = None
    try:
        yield
    except UserError as exc:
        message = str(exc)
    rank = world()[0]
    failures = [(r, m) for r, m in enumerate(from_every_rank(message)) if m is not None]
    if failures:
        where, text = next(((r, m) for r, m in failures if r == rank), failures[0])
        raise UserError(text if where == rank else f"{text} (on rank {where})")


def agree_on_overflow(scaler, optimizer):
    """Make an AMP overflow found on any rank skip the step on every rank.

    Call between ``scaler.unscale_(optimizer)`` and ``scaler.step(optimizer)``. GradScaler looks only at
    this process's gradients; where the processes hold different parameters (Partial FC shards) an
    inf in one shard would otherwise make one rank skip and halve its scale while the others step.
    """
    if world()[1] == 1 or not scaler.is_enabled():
        return
    for found_inf in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
        flag = all_reduce(found_inf.to(comm_device(found_inf.device)), dist.ReduceOp.MAX)
        found_inf.copy_(flag)


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
