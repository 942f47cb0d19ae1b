"""Demo BCT new model (CPU): the demo's network, data and old features (configs/demo/settings.py)."""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.common(edict(), settings.NEW_NETWORK, settings.NEW_SPLIT, "BCT")
config.old_prototype = settings.feature("avg_feature")
