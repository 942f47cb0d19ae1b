"""Demo UniBCT: the demo's new model (see configs/demo/settings.py) trained with UniBCT on CPU, published keys.

    python tools/run_demo.py --methods UniBCT        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "UniBCT")
config.old_prototype = settings.feature("avg_feature")
config.old_embedding = settings.feature("feature")
# the published refinement epochs and lr steps (of 35 epochs) scaled to the demo's length
published = settings.published("UniBCT")
config.refine_epochs = tuple(sorted({settings.scaled_epoch(e) for e in published.refine_epochs}))
config.lr_steps = tuple(sorted({settings.scaled_epoch(e) for e in published.lr_steps}))
