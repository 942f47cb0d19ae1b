"""The keys the demo's configs share, written out for the full profile (configs/demo/settings.py computes
them for any profile; tools/run_demo.py passes the differences with --set)."""
from easydict import EasyDict as edict

TRAINING = dict(embedding_size=128, input_size=32, batch_size=64, lr=0.2, warmup_epoch=1, fp16=False,
                channels_last=True, num_workers=0, frequent=20, save_every_steps=0, keep_checkpoints=1)
FEATURES = "work_dirs/demo/feature_save/OPclass/f128_r18_softmax_class70"   # the old features' path prefix


def old_model():
    """The old softmax model: r18 with an 8-channel stem, 2 epochs on class30."""
    return edict(TRAINING, network="r18", network_width=8, rec="dataset/synthetic/train_part_30_class",
                 output="work_dirs/demo/old_softmax", num_epoch=2, softmax_head="partial_fc")


def new_model(name):
    """A new ArcFace model: r18 with a 12-channel stem, 6 epochs on class70, into work_dirs/demo/<name>."""
    return edict(TRAINING, network="r18", network_width=12, rec="dataset/synthetic/train_part_70_class",
                 output=f"work_dirs/demo/{name}", margin_list=(1.0, 0.3, 0.0), scale=32.0, num_epoch=6, seed=666)
