"""Demo UniBCT: the demo's new model (see configs/demo/settings.py) trained with UniBCT on CPU.

    python tools/run_demo.py --methods UniBCT        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "UniBCT")
config.old_prototype = settings.feature("avg_feature")
config.old_embedding = settings.feature("feature")
# the published epochs 10/20 (refine) and 20/26/32 (lr ×0.1) of 35, scaled to the demo length
config.refine_epochs = tuple(sorted({settings.scaled_epoch(e, config.num_epoch) for e in (10, 20)}))
config.lr_schedule = "step"
config.lr_steps = tuple(sorted({settings.scaled_epoch(e, config.num_epoch) for e in (20, 26, 32)}))
# the influence logits are raw cosines (scale 1); the demo weighs them like the classifier's scale
config.loss_weight = settings.NEW_SCALE
