"""Step 1: train the old model with ArcFace through Partial FC.

    python train_old_arc.py configs/<config>.py                      # one process
    torchrun --nproc_per_node=8 train_old_arc.py configs/<config>.py
    python -m torch.distributed.launch --nproc_per_node=8 train_old_arc.py configs/<config>.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backbones import build_backbone
from losses import arcface_classifier
from utils.trainer import Method, main

if __name__ == "__main__":
    main(Method, build_backbone, arcface_classifier, description=__doc__.splitlines()[0])
