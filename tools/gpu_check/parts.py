"""The parts of the GPU check, most valuable first, each with its time limit (on a GPU; with ``--cpu-smoke``)."""
import dataclasses
import functools
import time
from typing import Callable

import torch

from tools.gpu_check import measure, scripts

PIPELINE_METHODS = ("MixBCT", "BCT", "UniBCT", "NCCL", "L2", "AdvBCT")


@dataclasses.dataclass
class Part:
    name: str
    run: Callable          # run(ctx) -> dict of figures (``ok`` False: a check that found a fault)
    gpu_limit: int         # seconds on a GPU
    cpu_limit: int         # seconds with --cpu-smoke
    needs: tuple = ()      # parts that must have succeeded first
    two_gpus: bool = False  # needs two GPUs (CPU smoke: two gloo processes)

    @property
    def doc(self):
        return " ".join((self.run.__doc__ or "").split())

    def limit(self, cuda):
        return self.gpu_limit if cuda else self.cpu_limit


@dataclasses.dataclass
class Context:
    """What a part gets: where it runs, its own work folder, the shared one, and when its time ends."""
    cuda: bool
    work: str              # this part's folder (emptied before it runs)
    shared: str            # the folder holding every part's folder
    deadline: float        # time.time() at which the part's limit ends

    @property
    def device(self):
        return torch.device("cuda" if self.cuda else "cpu")

    def remaining(self):
        return self.deadline - time.time()


def _method_part(method):
    run = functools.partial(scripts.train_method, method=method)
    run.__doc__ = scripts.train_method.__doc__.replace("``method``", method)
    return Part(f"train_{method}", run, 60, 120, needs=("features",))


def trainer_channels_last(ctx):
    """One process trains through ``train_old_arc.py`` with ``channels_last = True``."""
    return scripts.train_variant(ctx, channels_last=True)


def trainer_bf16(ctx):
    """One process trains through ``train_old_arc.py`` with ``amp_dtype = "bfloat16"`` (no loss scaling)."""
    result = scripts.train_variant(ctx, amp_dtype="bfloat16")
    result["ok"] = result["ok"] and not result["grad_scaler"]
    return result


def trainer_compile(ctx):
    """One process trains through ``train_old_arc.py`` with ``compile = True`` (inductor; the CPU smoke uses
    the ``aot_eager`` backend)."""
    return scripts.train_variant(ctx, compile=True if ctx.cuda else "aot_eager")


def softmax_linear(ctx):
    """One process trains the old softmax model through ``train_old_softmax.py`` with its linear head (AMP on CUDA)."""
    result = scripts.train_variant(ctx, script="train_old_softmax.py", softmax_head="linear")
    result["ok"] = result["ok"] and result["grad_scaler"] == ctx.cuda
    return result


def all_parts(methods=PIPELINE_METHODS):
    """Every part in order of value: what has never run on a GPU through the real scripts first."""
    return [Part("old_model", scripts.old_model, 120, 150),
            Part("features", scripts.features, 60, 90, needs=("old_model",)),
            *[_method_part(method) for method in methods],
            Part("method_steps", measure.method_steps, 90, 120),
            Part("amp_overflow", measure.amp_overflow, 45, 60),
            Part("faults", measure.faults, 150, 180),
            Part("deterministic_resume", scripts.deterministic_resume, 120, 150),
            Part("trainer_channels_last", trainer_channels_last, 60, 90),
            Part("trainer_bf16", trainer_bf16, 60, 90),
            Part("softmax_linear", softmax_linear, 60, 90),
            Part("trainer_compile", trainer_compile, 150, 240),
            Part("ijb_embedding", measure.ijb_embedding, 45, 60),
            Part("host_syncs", measure.host_syncs, 60, 90),
            Part("backbone_variants", measure.backbone_variants, 150, 90),
            Part("two_rank_partial_fc", measure.two_rank_partial_fc, 60, 90, two_gpus=True)]
