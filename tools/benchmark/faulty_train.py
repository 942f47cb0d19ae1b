"""train_old_arc.py with a fault injected at one step: how a failing run ends (bench_faults.py, the tests).

    FAULT=raise|kill|stall FAULT_STEP=5 FAULT_RANK=0 python tools/benchmark/faulty_train.py CONFIG

At step ``FAULT_STEP`` (1-based, before its loss) the process of rank ``FAULT_RANK`` prints
``injecting FAULT at <unix time>`` on stderr, then raises a RuntimeError (``raise``), kills itself with
SIGKILL (``kill``) or sleeps for an hour (``stall``: a hung peer).
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backbones import build_backbone
from losses import arcface_classifier
from utils.trainer import Method, main


class FaultyMethod(Method):
    def compute_loss(self, embeddings, labels, indices, ctx):
        if ctx.global_step + 1 == int(os.environ["FAULT_STEP"]) and ctx.dist.rank == int(os.environ.get("FAULT_RANK", 0)):
            fault = os.environ["FAULT"]
            print(f"injecting {fault} at {time.time():.3f}", file=sys.stderr, flush=True)
            if fault == "raise":
                raise RuntimeError(f"injected fault at step {ctx.global_step + 1}")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return super().compute_loss(embeddings, labels, indices, ctx)


if __name__ == "__main__":
    main(FaultyMethod, build_backbone, arcface_classifier)
