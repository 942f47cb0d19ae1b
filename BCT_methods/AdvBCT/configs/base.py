"""AdvBCT keys (merged over configs/base.py for every config in this folder); published defaults."""
from easydict import EasyDict as edict

config = edict()
config.old_embedding = None          # <SD>_feature.npy: old features (class centres/radii and discriminator input)
config.threshold = 0.4               # t of the elastic boundary
config.p2s_weight = 4.0              # weight of the point-to-set loss
config.adv_weight = 4.0              # adversarial weight, times (num_epoch - epoch + 1) / num_epoch
config.discriminator_hidden = 100    # hidden width of the discriminator
# published behaviour by default (docs/methods.md, "Differences from the published code"):
config.discriminator_joint_batch = False  # False: new and old features in two BatchNorm batches (published); True: one
config.p2s_average = "violating"     # point-to-set mean over violating samples (published); "all": every boundary sample
config.clip_extra_modules = True     # clip discriminator and boundary with the backbone (published); False: backbone only
