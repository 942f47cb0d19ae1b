"""Demo BCT: the demo's new model (see configs/demo/settings.py) trained with BCT on CPU, published keys.

    python tools/run_demo.py --methods BCT        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "BCT")
config.old_prototype = settings.feature("avg_feature")
