"""Independent new model (no compatibility constraint): r50, ArcFace, 512-d, MS1MV3 data100.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_arc.py configs/f512_r50_arc_data100.py
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r50"
config.embedding_size = 512
config.margin_list = (1.0, 0.5, 0.0)
config.sample_rate = 1.0
config.fp16 = True
config.batch_size = 128
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 35
config.warmup_epoch = 0
config.rec = "dataset/ms1m-retinaface-t1"
config.num_classes = 93431
config.num_image = 5179510
config.num_workers = 4
config.frequent = 10
