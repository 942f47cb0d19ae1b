"""Demo independent new model: larger network, ArcFace, new split, no compatibility constraint."""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.common(edict(), settings.NEW_NETWORK, settings.NEW_SPLIT, "independent")
