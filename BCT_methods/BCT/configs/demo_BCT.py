"""Demo BCT: the demo's new model (see configs/demo/settings.py) trained with BCT on CPU.

    python tools/run_demo.py --methods BCT        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "BCT")
config.old_prototype = settings.feature("avg_feature")
# the influence logits are raw cosines (scale 1); the demo weighs them like the classifier's scale
config.loss_weight = settings.NEW_SCALE
