"""Demo NCCL: the demo's new model (see configs/demo/settings.py) trained with NCCL on CPU, published keys.

    python tools/run_demo.py --methods NCCL        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "NCCL")
config.old_embedding = settings.feature("feature")
# the published queue holds 0.23 % of the training set (at least one global batch)
config.queue_size = settings.same_fraction(settings.published("NCCL").queue_size)
