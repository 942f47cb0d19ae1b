"""Training checkpoints: one file per process and step, written atomically, the last K kept.

``<output>/checkpoints/step_<step>_rank<r>.pt`` holds everything a process needs to continue
exactly: model, classifier shard, optimiser, scaler, scheduler, method state, RNG states and the
position in the epoch. Resuming picks the newest step whose files load on every rank; a corrupt or
partial file is reported and the previous checkpoint is used instead.
"""
import glob
import os
import re

import torch
import torch.distributed as dist

from utils.errors import UserError
from utils.io import atomic_torch_save, safe_torch_load

_NAME = re.compile(r"step_(\d+)_rank(\d+)\.pt$")


class CheckpointManager:
    def __init__(self, output, rank, world_size, keep=2, log=print):
        self.folder = os.path.join(output, "checkpoints")
        self.rank, self.world_size, self.keep, self.log = rank, world_size, max(int(keep), 1), log

    def path(self, step, rank=None):
        return os.path.join(self.folder, f"step_{step:09d}_rank{self.rank if rank is None else rank}.pt")

    def steps(self, rank=None):
        """Steps with a checkpoint file of ``rank`` (default: this process), newest first."""
        rank = self.rank if rank is None else rank
        found = []
        for name in glob.glob(os.path.join(self.folder, f"step_*_rank{rank}.pt")):
            match = _NAME.search(name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found, reverse=True)

    def save(self, step, state):
        """Write this process's checkpoint for ``step`` and delete its older ones beyond ``keep``."""
        atomic_torch_save(state, self.path(step))
        for old in self.steps()[self.keep:]:
            try:
                os.remove(self.path(old))
            except FileNotFoundError:
                pass

    def load_latest(self):
        """Newest checkpoint that every rank can load (this rank's state), or ``None`` if none exist."""
        candidates = [s for s in self.steps() if all(os.path.isfile(self.path(s, r)) for r in range(self.world_size))]
        candidates = _agree(candidates)
        for step in candidates:
            try:
                state = safe_torch_load(self.path(step))
                ok = 1
            except UserError as exc:
                self.log(f"warning: checkpoint {self.path(step)} is unusable ({exc}); trying the previous one")
                state, ok = None, 0
            flag = torch.tensor([ok], dtype=torch.int64)
            if dist.is_initialized() and dist.get_backend() == "nccl":
                flag = flag.cuda()
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 1:
                return state
        return None


def _agree(steps):
    """Steps present on every process (they may see different folders on multi-node runs)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return steps
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, steps)
    common = set(gathered[0]).intersection(*map(set, gathered[1:]))
    return sorted(common, reverse=True)
