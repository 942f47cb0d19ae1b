"""Demo AdvBCT: the demo's new model (see configs/demo/settings.py) trained with AdvBCT on CPU.

    python tools/run_demo.py --methods AdvBCT        # runs it inside the whole pipeline
"""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "AdvBCT")
config.old_embedding = settings.feature("feature")
# the published adversarial weight (4) overwhelms the classifier of a network this small; a tenth of it
config.adv_weight = 0.4
# the point-to-set penalty on cosine-scale distances, weighed like the classifier's scale
config.p2s_weight = settings.NEW_SCALE
