"""MixBCT, EXdata, softmax → ArcFace, 128-d.

Old model: r18 softmax trained on data30 (configs/f128_r18_softmax_data30.py).
New model: r50 ArcFace trained on the full set.
Old features: feature_save/EXdata/f128_r18_softmax_data100_*.npy (steps 2–4).

    cd BCT_methods/MixBCT
    python -m torch.distributed.launch --nproc_per_node=8 train.py configs/EXdata_ms1mv3_r18_to_r50_MixBCT_softmax_to_arc_f128.py
"""
from configs.scenarios import Experiment

run = Experiment("EXdata", "softmax_to_arc_f128")
config = run.new_model()
config.credible_old_feature = run.feature("credible_ratio_90")
config.old_embedding = run.feature("feature")
