"""Defaults for every training config (insightface arcface_torch names).

A config file changes only what differs. ``num_classes``/``num_image`` left as ``None`` are read
from the dataset. Relative paths are taken from the repository root.
"""
from easydict import EasyDict as edict

config = edict()

# data
config.rec = None                  # path prefix (…/train_part_70_class → .rec/.idx) or a folder with train.rec/.idx
config.num_classes = None          # None: read from the data
config.num_image = None            # None: read from the data
config.num_workers = 2
config.dali = False                # NVIDIA DALI loader (not provided: must stay False)
config.val_targets = []            # .bin verification sets (not provided: evaluate with tools/ijbc_eval)

# model
config.network = "r50"
config.embedding_size = 512
config.network_width = 64          # stem/stage-1 width (64 = published); small values for CPU runs
config.input_size = 112            # input side in pixels (112 = published; 56/32 for CPU runs)
config.dropout = 0.0

# loss: margin_list = (m1, m2, m3) → cos(m1·θ + m2) − m3; ArcFace (1.0, 0.5, 0.0), CosFace (1.0, 0.0, 0.4)
config.margin_list = (1.0, 0.5, 0.0)
config.scale = 64.0
config.sample_rate = 1.0
config.softmax_head = "linear"     # train_old_softmax.py: "linear" nn.Linear head clipped with the backbone (published) | "partial_fc"
config.interclass_filtering_threshold = 0

# optimisation
config.optimizer = "sgd"           # sgd | adamw
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.batch_size = 128            # per process
config.num_epoch = 35
config.warmup_epoch = 0
config.lr_schedule = "poly"        # poly | step
config.lr_power = 2.0              # poly schedule power
config.lr_steps = ()               # step schedule: epochs where lr is multiplied by 0.1
config.clip_grad = 5.0             # gradient-norm clip on the backbone (0 = off)
config.fp16 = True                 # AMP fp16 on CUDA (always off on CPU)
config.amp_dtype = "float16"       # AMP dtype when fp16 = True: float16 (published, loss scaling) | bfloat16 (no scaling)
# CUDA TF32 (Ampere and newer): False full fp32; True matrix products and convolutions; "conv" convolutions
# only (PyTorch's own default, what the published runs had)
config.tf32 = False
config.channels_last = False       # backbone and input batches in channels_last memory format
config.compile = False             # torch.compile the training model: True (inductor) or a backend name ("aot_eager")
# under AMP: "body" conv body in the AMP dtype, final fc + feature BN fp32 (published BCT, UniBCT, AdvBCT, old
# softmax); "none" backbone fp32 (published MixBCT, NCCL, L2, old ArcFace, independent); "all" whole backbone in AMP
config.backbone_amp = "body"
config.amp_logits = True           # under AMP: Partial FC cosine logits computed in the AMP dtype (published); False: fp32
config.amp_growth_interval = 100   # GradScaler growth interval (published 100; PyTorch's default 2000)
# fp16 AMP: an inf/NaN gradient on any process skips the step on all of them (False: each process decides from
# its own gradients, as published, and an overflow in one classifier shard makes the replicas drift apart)
config.agree_overflow = True
config.seed = 666                  # each process uses seed + rank
config.deterministic = False       # deterministic kernels (exact resume on CPU)
config.device = None               # None: cuda if available, else cpu
config.dist_timeout_minutes = 10.0  # several processes: the longest wait for the others outside the training steps
config.step_timeout_minutes = 30.0  # ... and inside the training loop (UniBCT's refinement runs on rank 0 meanwhile)

# output, logging, checkpoints
config.output = None               # None: work_dirs/<config name>
config.resume = False              # True: continue from the last checkpoint (an error if none); "auto": when one exists
config.frequent = 10               # log every N steps
config.verbose = 2000              # kept for insightface compatibility (no .bin verification here)
config.save_every_steps = 0        # extra checkpoint every N steps (0: once per epoch only)
config.keep_checkpoints = 2        # checkpoints kept per process
config.max_steps = 0               # stop after N optimiser steps (0: the whole schedule)
