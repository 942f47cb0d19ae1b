"""NCCL keys (merged over configs/base.py for every config in this folder); published defaults."""
from easydict import EasyDict as edict

config = edict()
config.old_embedding = None          # <SD>_feature.npy: old features of the new training set (dataset order)
config.credible_old_feature = None   # optional 0/1 highly-credible mask (None: every old feature is used)
config.queue_size = 8192             # FIFO queue of old features, labels and old logits
config.alpha = 1.0                   # weight of l1 (embedding level)
config.beta = 0.01                   # weight of l2 (logit level)
config.temperature = 1.0             # τ of both contrastive softmaxes
# published behaviour by default (docs/methods.md, "Differences from the published code"):
config.l1_gradient_scale = 8.0       # l1 × this: the published all-gather backward scaled l1 by the 8 GPUs; 1 = α
config.l2_gradient = False           # False: l2 is logged and trains nothing (published); True: l2 trains the model
config.mask_empty_slots = False      # False: empty queue slots (zeros) stay in the softmax denominators (published); True: masked
config.backbone_amp = "none"        # published: this method's backbone ran in fp32 (no autocast) also with fp16
