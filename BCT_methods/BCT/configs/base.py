"""BCT keys (merged over configs/base.py for every config in this folder); published defaults."""
from easydict import EasyDict as edict

config = edict()
config.old_prototype = None          # <SD>_avg_feature.npy: old class prototypes (step 3), one row per class
config.loss_weight = 1.0             # λ of the influence loss
config.warmup_epoch = -1            # published: with the poly schedule no warm-up and lr × (T/(T+1 epoch))² throughout (BCT)
