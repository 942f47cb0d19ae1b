"""Step 5, UniBCT: BCT with old prototypes refined by graph propagation at the refine epochs.

    cd BCT_methods/UniBCT
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/<config>.py
    torchrun --nproc_per_node=8 train.py configs/<config>.py
    python train.py configs/<config>.py                                   # one process (GPU or CPU)

Also runs from the repository root: python BCT_methods/UniBCT/train.py BCT_methods/UniBCT/configs/<config>.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backbones import build_backbone
from BCT_methods.UniBCT.losses import UniBCT
from losses import arcface_classifier
from utils.trainer import main

if __name__ == "__main__":
    main(UniBCT, build_backbone, arcface_classifier, description=__doc__.splitlines()[0])
