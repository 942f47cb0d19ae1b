"""NCCL, OPclass, softmax → ArcFace, 256-d.

Old model: r18 softmax trained on class30 (configs/f256_r18_softmax_class30.py).
New model: r50 ArcFace trained on class70 (identities disjoint from class30).
Old features: feature_save/OPclass/f256_r18_softmax_class70_*.npy (steps 2–4).

    cd BCT_methods/NCCL
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/OPclass_ms1mv3_r18_to_r50_NCCL_softmax_to_arc_f256.py
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r50"
config.embedding_size = 256
config.margin_list = (1.0, 0.5, 0.0)
config.sample_rate = 1.0
config.fp16 = True
config.batch_size = 128
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.num_epoch = 35
config.warmup_epoch = 0
config.rec = "dataset/ms1m-retinaface-t1/train_part_70_class"
config.num_classes = 65402
config.num_image = 3598269
config.num_workers = 4
config.frequent = 10
config.old_embedding = "feature_save/OPclass/f256_r18_softmax_class70_feature.npy"
config.queue_size = 8192
config.alpha = 1.0
config.beta = 0.01
config.temperature = 1.0
