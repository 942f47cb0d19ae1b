"""Demo L2: the demo's new model (see configs/demo/settings.py) trained with L2 on CPU, published keys.

    python tools/run_demo.py --methods L2        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "L2")
config.old_embedding = settings.feature("feature")
