"""MixBCT keys (merged over configs/base.py for every config in this folder); published defaults."""
from easydict import EasyDict as edict

config = edict()
config.old_embedding = None          # <SD>_feature.npy: old features of the new training set (dataset order)
config.credible_old_feature = None   # <SD>_credible_ratio_90_feature.npy: 0/1 denoising mask (step 4)
config.mix_ratio = 0.3               # up to int(batch_size * mix_ratio) embeddings per process replaced per step
config.backbone_amp = "none"        # published: this method's backbone ran in fp32 (no autocast) also with fp16
