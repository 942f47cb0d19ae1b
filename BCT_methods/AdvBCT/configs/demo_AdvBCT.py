"""Demo AdvBCT new model (CPU): the demo's network, data and old features (configs/demo/settings.py)."""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.common(edict(), settings.NEW_NETWORK, settings.NEW_SPLIT, "AdvBCT")
config.old_embedding = settings.feature("feature")
