"""MixBCT, OPclass, softmax → ArcFace, 256-d.

Old model: r18 softmax trained on class30 (configs/f256_r18_softmax_class30.py).
New model: r50 ArcFace trained on class70 (identities disjoint from class30).
Old features: feature_save/OPclass/f256_r18_softmax_class70_*.npy (steps 2–4).

    cd BCT_methods/MixBCT
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/OPclass_ms1mv3_r18_to_r50_MixBCT_softmax_to_arc_f256.py
"""
from configs.scenarios import Experiment

run = Experiment("OPclass", "softmax_to_arc_f256", "MixBCT")
config = run.new_model()
config.credible_old_feature = run.feature("credible_ratio_90")
config.old_embedding = run.feature("feature")
