"""Step 5, MixBCT: train the new model on batches where credible old features replace some new embeddings.

    cd BCT_methods/MixBCT
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/<config>.py
    torchrun --nproc_per_node=8 train.py configs/<config>.py
    python train.py configs/<config>.py                                   # one process (GPU or CPU)

Also runs from the repository root: python BCT_methods/MixBCT/train.py BCT_methods/MixBCT/configs/<config>.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from backbones import build_backbone
from BCT_methods.MixBCT.losses import MixBCT
from losses import arcface_classifier
from utils.trainer import main

if __name__ == "__main__":
    main(MixBCT, build_backbone, arcface_classifier, description=__doc__.splitlines()[0])
