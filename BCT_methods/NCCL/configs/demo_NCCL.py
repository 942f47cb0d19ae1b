"""Demo NCCL: the demo's new model (see configs/demo/settings.py) trained with NCCL on CPU.

    python tools/run_demo.py --methods NCCL        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "NCCL")
config.old_embedding = settings.feature("feature")
# a sharper contrastive softmax than the published τ = 1, which barely moves a network this small in a few epochs
config.temperature = 0.05
