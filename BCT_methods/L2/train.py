"""Step 5, L2 / weakened L2: train the new model with a (margin-tolerant) L2 pull towards the old features.

    cd BCT_methods/L2
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/<config>.py
    torchrun --nproc_per_node=8 train.py configs/<config>.py
    python train.py configs/<config>.py                                   # one process (GPU or CPU)

Also runs from the repository root: python BCT_methods/L2/train.py BCT_methods/L2/configs/<config>.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backbones import build_backbone
from BCT_methods.L2.losses import L2
from losses import arcface_classifier
from utils.trainer import main

if __name__ == "__main__":
    main(L2, build_backbone, arcface_classifier, description=__doc__.splitlines()[0])
