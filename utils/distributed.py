"""Process-group setup for every launcher.

Works under ``python -m torch.distributed.launch`` (``--local_rank``/``--local-rank``), ``torchrun``
(env vars, multi-node) and a plain ``python script.py config.py`` (world size 1: a private file
store, so no port is ever taken). NCCL on CUDA, gloo on CPU.
"""
import dataclasses
import datetime
import os
import tempfile

import torch
import torch.distributed as dist

from utils.config import add_launcher_args  # noqa: F401  (torch-free, for commands that may not launch)
from utils.errors import UserError

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


def init_distributed(local_rank=None, device=None, timeout_minutes=30):
    """Initialise (once) the default process group and return this process's :class:`DistInfo`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = choose_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if world_size > 1 or "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, init_method="env://", rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            store = os.path.join(tempfile.mkdtemp(prefix="bct-pg-"), "store")
            dist.init_process_group(backend, init_method="file://" + store, rank=0,
                                    world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev)


def cleanup():
    """Destroy the process group if one is initialised."""
    if dist.is_initialized():
        dist.destroy_process_group()


def comm_device(dist_info):
    """Where tensors for a collective must live: the rank's GPU under NCCL, else the CPU."""
    return dist_info.device if dist.get_backend() == "nccl" else torch.device("cpu")
