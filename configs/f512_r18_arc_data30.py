"""Old model: r18, ArcFace, 512-d, MS1MV3 data30.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_arc.py configs/f512_r18_arc_data30.py
"""
from configs.scenarios import old_model

config = old_model("data30", "arc", 512)
