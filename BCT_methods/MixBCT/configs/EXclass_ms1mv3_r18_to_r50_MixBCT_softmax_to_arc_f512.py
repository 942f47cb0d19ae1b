"""MixBCT, EXclass, softmax → ArcFace, 512-d.

Old model: r18 softmax trained on class30 (configs/f512_r18_softmax_class30.py).
New model: r50 ArcFace trained on the full set.
Old features: feature_save/EXclass/f512_r18_softmax_class100_*.npy (steps 2–4).

    cd BCT_methods/MixBCT
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/EXclass_ms1mv3_r18_to_r50_MixBCT_softmax_to_arc_f512.py
"""
from configs.scenarios import Experiment

run = Experiment("EXclass", "softmax_to_arc_f512")
config = run.new_model()
config.credible_old_feature = run.feature("credible_ratio_90")
config.old_embedding = run.feature("feature")
