"""Image folders of aligned face crops, ``ROOT/<identity>/<image>``: read by tools/pack_rec.py and compat_eval."""
import os

import numpy as np

from utils.errors import require

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def list_identities(root, name=None):
    """``(identities, image paths, labels)`` of ``ROOT/<identity>/<image>``, sorted by name (``name``: how
    messages call the root, default its path)."""
    name = name or root
    require(os.path.isdir(root), f"{name}: not a folder (expected ROOT/<identity>/<image>)")
    identities = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    require(identities, f"{name}: holds no identity folders (expected ROOT/<identity>/<image>)")
    files, labels = [], []
    for label, identity in enumerate(identities):
        require("\t" not in identity and "\n" not in identity, f"{root}: identity folder name {identity!r} "
                                                               "contains a tab or newline")
        folder = os.path.join(root, identity)
        images = sorted(e.name for e in os.scandir(folder)
                        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        require(images, f"{folder}: identity folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += [os.path.join(folder, name) for name in images]
        labels += [label] * len(images)
    return identities, files, np.array(labels, np.int64)
