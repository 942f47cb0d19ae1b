"""Training checkpoints: one file per process and step, written atomically, the last K kept.

``<output>/checkpoints/step_<step>_rank<r>.pt`` holds everything a process needs to continue
exactly: model, classifier shard, optimiser, scaler, scheduler, method state, RNG states and the
position in the epoch. Each process reads only its own file, so a multi-node run whose nodes write
to their own disks resumes too. Resuming picks the newest step whose file every rank has and can
load; a corrupt or partial file is reported and the previous checkpoint is used instead. When
some ranks find checkpoints and others none (a rank on a node whose disk does not hold its
files), or the ranks have no step in common, every rank stops with one line.

Beside them, what a checkpoint needs from the process: its RNG states (:func:`rng_state`,
:func:`set_rng_state`) and the stop request of a signal (:class:`StopFlag`).
"""
import glob
import os
import random
import re
import signal

import numpy as np
import torch

from utils.distributed import every_rank, fail_together, from_every_rank
from utils.errors import UserError, about_file
from utils.io import atomic_torch_save, safe_torch_load

_NAME = re.compile(r"step_(\d+)_rank(\d+)\.pt$")


class CheckpointManager:
    def __init__(self, output, rank, keep=2, log=print, device="cpu"):
        self.folder = os.path.join(output, "checkpoints")
        self.rank, self.keep, self.log = rank, max(int(keep), 1), log
        self.device = device

    def path(self, step):
        return os.path.join(self.folder, f"step_{step:09d}_rank{self.rank}.pt")

    def steps(self):
        """Steps with a checkpoint file of this process, newest first."""
        found = []
        for name in glob.glob(os.path.join(self.folder, f"step_*_rank{self.rank}.pt")):
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

    def load_latest(self, required=True):
        """This rank's state of the newest step that every rank has and can load; ``None`` when no rank has a
        checkpoint and not ``required``. Raises :class:`UserError` on every rank when no rank has one and
        ``required``, when some ranks have none, or when no step can be loaded by every rank.

        Each rank looks only at its own files (other ranks' files may sit on other nodes' disks).
        """
        every = from_every_rank(self.steps())
        if not any(every):
            if required:
                raise UserError(f"--resume: no checkpoint under {self.folder} (on any process's disk); train "
                                "without --resume, or set resume = 'auto' to resume only when there is one")
            self.log(f"resume = 'auto': no checkpoint under {self.folder} yet, starting from scratch")
            return None
        found = ", ".join(f"rank {r}: {f'step {s[0]}' if s else 'none'}" for r, s in enumerate(every))
        if not all(every):
            raise UserError(f"--resume: some processes found no checkpoint under {self.folder} (newest {found}); "
                            "each process reads its own files, so on node-local disks every rank must run on "
                            "the node that wrote them")
        common = sorted(set(every[0]).intersection(*map(set, every[1:])), reverse=True)
        if not common:
            raise UserError(f"--resume: the processes have no checkpoint step in common under {self.folder} "
                            f"(newest {found})")
        if common[0] != max(max(steps) for steps in every):
            self.log(f"warning: not every process has the newest checkpoint (newest {found}: an interrupted "
                     f"save); resuming from step {common[0]}")
        for step in common:
            try:
                state = safe_torch_load(self.path(step))
            except UserError as exc:
                self.log(f"warning: checkpoint {self.path(step)} is unusable ({exc}); trying the previous one")
                state = None
            if every_rank(state is not None, self.device):
                return state
        raise UserError(f"--resume: no checkpoint under {self.folder} can be loaded by every process (steps "
                        f"{', '.join(map(str, common))} tried)")

    def resume(self, state, required=True):
        """Load the newest checkpoint (:meth:`load_latest`) into ``state`` (its ``load_state_dict``); False when
        there is none (``required`` False)."""
        saved = self.load_latest(required)
        if saved is None:
            return False
        with fail_together(), about_file(self.folder):
            state.load_state_dict(saved)
        return True


def rng_state(device):
    """Python, numpy and torch CPU RNG states, plus that of ``device`` when it is a GPU."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached": float(np_state[4])}
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Restore :func:`rng_state`; the GPU state goes to ``device`` (whichever GPU this process has now)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    device = torch.device(device)
    if device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)


def seed_everything(seed):
    """Seed Python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopFlag:
    """Set by SIGTERM/SIGINT while the context is active; the loop polls ``signum`` (0 until a signal came)."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
