"""Demo AdvBCT: the demo's new model (see configs/demo/settings.py) trained with AdvBCT on CPU, published keys.

    python tools/run_demo.py --methods AdvBCT        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "AdvBCT")
config.old_embedding = settings.feature("feature")
