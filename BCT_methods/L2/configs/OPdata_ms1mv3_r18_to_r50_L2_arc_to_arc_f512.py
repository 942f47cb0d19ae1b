"""L2, OPdata, arc → ArcFace, 512-d.

Old model: r18 arc trained on data30 (configs/f512_r18_arc_data30.py).
New model: r50 ArcFace trained on data70 (same identities, other images).
Old features: feature_save/OPdata/f512_r18_arc_data70_*.npy (steps 2–4).

    cd BCT_methods/L2
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/OPdata_ms1mv3_r18_to_r50_L2_arc_to_arc_f512.py
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
config.rec = "dataset/ms1m-retinaface-t1/train_part_70_data"
config.num_classes = 93431
config.num_image = None  # read from the data
config.num_workers = 4
config.frequent = 10
config.old_embedding = "feature_save/OPdata/f512_r18_arc_data70_feature.npy"
config.loss_weight = 10.0
config.threshold = 0.0
