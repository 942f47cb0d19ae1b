"""Old model: r18, softmax, 128-d, MS1MV3 data30.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_softmax.py configs/f128_r18_softmax_data30.py
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r18"
config.embedding_size = 128
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
