"""Demo MixBCT: the demo's new model (see configs/demo/settings.py) trained with MixBCT on CPU, published keys.

    python tools/run_demo.py --methods MixBCT        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "MixBCT")
config.old_embedding = settings.feature("feature")
config.credible_old_feature = settings.feature("credible_ratio_90_feature")
