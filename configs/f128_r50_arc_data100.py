"""Independent new model (no compatibility constraint): r50, ArcFace, 128-d, MS1MV3 data100.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_arc.py configs/f128_r50_arc_data100.py
"""
from configs.scenarios import independent_model

config = independent_model(128)
