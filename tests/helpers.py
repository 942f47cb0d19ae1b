"""Small builders shared by the tests: tiny RecordIO datasets and tiny configs."""
import os
import subprocess
import sys
import textwrap

import numpy as np

from utils.config import write_config  # noqa: F401  (the tests build their configs with it)
from utils.distributed import free_port  # noqa: F401  (the master port of spawned ranks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_rec(folder, num_classes=6, per_class=8, size=32, seed=0, name="train"):
    """Write ``<folder>/<name>.rec/.idx`` and its property file (``<folder>/property`` for ``train``,
    else ``<folder>/<name>.property``): class-coloured noisy images, labels by class.

    Returns the rec argument a config takes (the folder for ``train``, else the path prefix).
    """
    from utils.recordio import IRHeader, MXIndexedRecordIO, encode_image, pack

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    prefix = os.path.join(folder, name)
    colours = rng.integers(0, 256, size=(num_classes, 3))
    with MXIndexedRecordIO(prefix + ".idx", prefix + ".rec", "w") as writer:
        key = 0
        for label in range(num_classes):
            for _ in range(per_class):
                noise = rng.normal(0, 30, size=(size, size, 3))
                image = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
                writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), encode_image(image)))
                key += 1
    with open(os.path.join(folder, "property") if name == "train" else prefix + ".property", "w") as handle:
        handle.write(f"{num_classes},{size},{size}\n")
    return folder if name == "train" else prefix


def synthetic_faces(root, identities, per_identity):
    """make_synthetic's training set in ``root/synthetic`` and the same JPEGs as an image folder
    ``root/faces/person<label>/<index>.jpg``; returns the folder."""
    from tools.synthetic import make_synthetic
    from utils.dataset import MXFaceDataset
    from utils.recordio import unpack

    root = str(root)
    make_synthetic.main(["--out", os.path.join(root, "synthetic"), "--identities", str(identities),
                         "--images-per-identity", str(per_identity), "--ijb-identities", "2", "--workers", "0"])
    dataset = MXFaceDataset(os.path.join(root, "synthetic"), train=False)
    for i, offset in enumerate(dataset.offsets.tolist()):
        header, jpeg = unpack(dataset.record.read_at(offset))
        folder = os.path.join(root, "faces", f"person{int(header.label):02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:03d}.jpg"), "wb") as handle:
            handle.write(jpeg)
    return os.path.join(root, "faces")


def chunk_files(cache):
    """Sorted paths of the saved chunks (``chunk_*.npz``) anywhere under a resume-cache root."""
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(cache) for name in names
                  if name.startswith("chunk_"))


TINY_MODEL = dict(network="r18", network_width=8, input_size=32, embedding_size=16, dropout=0.0)


def tiny_train_config(path, rec, output, **overrides):
    """A config that trains a tiny backbone for a few CPU steps."""
    keys = dict(TINY_MODEL, rec=rec, output=output, batch_size=8, num_epoch=2, lr=0.05,
                num_workers=0, frequent=1, fp16=False, seed=5, deterministic=True)
    keys.update(overrides)
    return write_config(path, **keys)


def run(args, cwd=ROOT, env=None, timeout=300):
    """Run a command (list) with the repo on PYTHONPATH; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    full_env.update(env or {})
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def python(*args, **kwargs):
    return run([sys.executable, *args], **kwargs)


def dedent(text):
    return textwrap.dedent(text)
