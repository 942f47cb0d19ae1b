"""L2 / weakened L2 keys (merged over configs/base.py for every config in this folder); published defaults."""
from easydict import EasyDict as edict

config = edict()
config.old_embedding = None          # <SD>_feature.npy: old features of the new training set (dataset order)
config.loss_weight = 10.0            # λ
config.threshold = 0.0               # margin t: 0 = L2, 0.2 = weakened L2
config.backbone_amp = "none"        # published: this method's backbone ran in fp32 (no autocast) also with fp16
