"""Old model: r18, ArcFace, 512-d, MS1MV3 data30.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_arc.py configs/f512_r18_arc_data30.py
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r18"
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
config.rec = "dataset/ms1m-retinaface-t1/train_part_30_data"
config.num_classes = 93431
config.num_image = None
config.num_workers = 4
config.frequent = 10
