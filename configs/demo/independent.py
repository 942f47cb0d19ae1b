"""Demo independent new model: wider network, ArcFace, new split, no compatibility constraint."""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.new_model(edict(), "independent")
