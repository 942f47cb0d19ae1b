"""Demo UniBCT new model (CPU): the demo's network, data and old features (configs/demo/settings.py)."""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.common(edict(), settings.NEW_NETWORK, settings.NEW_SPLIT, "UniBCT")
config.old_prototype = settings.feature("avg_feature")
config.old_embedding = settings.feature("feature")
# the published epochs (refine at 10 and 20, lr x0.1 at 20, 26, 32 of 35) scaled to the demo schedule
config.refine_epochs = tuple(sorted({max(1, round(config.num_epoch * e / 35)) for e in (10, 20)}))
config.lr_schedule = "step"
config.lr_steps = tuple(sorted({max(1, round(config.num_epoch * e / 35)) for e in (20, 26, 32)}))
