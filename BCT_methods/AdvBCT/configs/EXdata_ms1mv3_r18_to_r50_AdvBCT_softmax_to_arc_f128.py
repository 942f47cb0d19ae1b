"""AdvBCT, EXdata, softmax → ArcFace, 128-d.

Old model: r18 softmax trained on data30 (configs/f128_r18_softmax_data30.py).
New model: r50 ArcFace trained on the full set.
Old features: feature_save/EXdata/f128_r18_softmax_data100_*.npy (steps 2–4).

    cd BCT_methods/AdvBCT
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/EXdata_ms1mv3_r18_to_r50_AdvBCT_softmax_to_arc_f128.py
"""
from easydict import EasyDict as edict

config = edict()
config.network = "r50"
config.embedding_size = 128
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
config.old_embedding = "feature_save/EXdata/f128_r18_softmax_data100_feature.npy"
config.threshold = 0.4
config.p2s_weight = 4.0
config.adv_weight = 4.0
